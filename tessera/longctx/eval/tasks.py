"""RULER-style tasks for the long-context modes, with a development and a held-out split.

Five tasks, each a needle (or several) hidden in a haystack, then a question:
- paraphrase: one fact whose wording differs from the question's (only the person's name is shared);
- multikey: the right fact among four alike, which differ only in their key and value (the other three
  share the question's words but not its answer);
- multivalue: three facts about one key; the question asks for every value;
- vartrack: a chain of three assignments (A = value, B = A, C = B); the question asks for every variable
  that holds the value;
- qa: a short passage of several facts about an invented subject; the question, worded apart from the
  passage, asks for one of them.

The split is fixed by SPLIT_SEED: every task's wordings (templates) and every pool of names and values
are shuffled by it and cut in two, the first half for development, the second held out. A held-out
sample shares no wording and no filler with a development one, so settings chosen on the development
set (the only set to choose them on) are seen on text they were not chosen for.

A cell is (task, split, length); its samples are one per depth (DEPTHS: ten, 0 to 100 %), built from a
seed of their own (the task, split, length and depth index), on the essays at even depth indices and on
the Britannica article at odd ones (on the essays where the article is too short).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tessera.longctx.eval.haystacks import Haystacks

SPLIT_SEED = 21
SPLITS = ("dev", "heldout")
TASKS = ("paraphrase", "multikey", "multivalue", "vartrack", "qa")
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DEPTHS = tuple(round(100 * i / 9, 1) for i in range(10))
SYSTEM = "You are a helpful assistant. Answer the question at the end of the text in one sentence, using the text."


@dataclass(frozen=True)
class Sample:
    task: str
    split: str
    length: int  # tokens of haystack and needles (the question and chat template come on top)
    depth: float  # where the fact asked about lies, percent of the way into the text
    haystack: str
    context: str
    question: str
    answers: tuple[str, ...]  # what a correct answer contains (several: each one counts a share)
    facts: tuple[str, ...] = ()  # the needles' texts, the one at `depth` first

    def conversation(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": self.context + "\n\n" + self.question}]


def split_half(items: list, split: str, salt: str) -> list:
    """`split`'s half of `items`, shuffled by SPLIT_SEED and `salt`: the development set takes the first
    half, the held-out set the rest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shuffled = random.Random(f"{SPLIT_SEED}/{salt}").sample(items, len(items))
    half = len(shuffled) // 2
    return shuffled[:half] if split == "dev" else shuffled[half:]


# -- the pools -------------------------------------------------------------------------------------

NAMES = ["Martha Quill", "Oskar Brandt", "Lena Hoffman", "Tobias Reed", "Priya Nandakumar", "Jonas Whitfield",
         "Clara Montague", "Felix Ambrose", "Ingrid Solberg", "Rafael Ortega", "Beatrice Lowell", "Samuel Achebe",
         "Yuki Tanabe", "Hector Villanueva", "Greta Lindqvist", "Desmond Carver", "Amara Okafor", "Victor Halloran",
         "Nadia Petrova", "Casper Ellingham", "Rosalind Finch", "Ibrahim Haddad", "Maeve Donnelly", "Anton Kessler"]
TOWNS = ["Harlow Creek", "Marrowdale", "Pennick Cove", "Astbury", "Quillon", "Fennmoor", "Dunmarrow", "Sallowby",
         "Thistlewick", "Orrin Falls", "Caddon Mill", "Wexley Ford"]
FILLERS = {
    "thing": ["flowerpot", "doormat", "birdbath", "watering can", "garden gnome", "loose brick", "rain barrel",
              "boot scraper"],
    "place": ["lighthouse", "monastery", "windmill", "orchard", "railway station", "harbour", "old mill", "abbey"],
    "word": ["marmalade", "zeppelin", "pinecone", "lantern", "quasar", "saffron", "tortoise", "harmonica"],
    "pet": ["Biscuit", "Pepper", "Mochi", "Ziggy", "Noodle", "Clementine", "Waffles", "Juniper"],
    "plant": ["sunflowers", "lavender", "tulips", "tomatoes", "rhubarb", "marigolds", "blueberries", "dahlias"],
    "instrument": ["cello", "banjo", "oboe", "accordion", "harp", "trombone", "ukulele", "bagpipes"],
    "drink": ["chamomile tea", "warm milk", "cocoa", "peppermint tea", "ginger tea", "hot lemon water", "rooibos",
              "barley water"],
    "job": ["lighthouse keeper", "locksmith", "glassblower", "beekeeper", "cartographer", "bookbinder", "tailor",
            "clockmaker"],
    "color": ["turquoise", "crimson", "olive green", "mustard yellow", "lilac", "burnt orange", "navy blue",
              "coral pink"],
    "collectible": ["postage stamps", "pocket watches", "seashells", "vinyl records", "tin soldiers",
                    "fountain pens", "matchboxes", "keys"],
    "river": ["Tamsin", "Orla", "Brevin", "Calder", "Yarrow", "Meldon", "Ashwell", "Corran"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "cargo": ["tea", "copper", "salt", "wool", "timber", "coffee", "tobacco", "sugar"],
    "ship": ["Gull", "Meridian", "Lark", "Serafina", "Corvid", "Halcyon", "Wren", "Kestrel"],
    "club": ["Astronomical", "Beekeeping", "Chess", "Cycling", "Folk Dance", "Orchid", "Rowing", "Stamp"],
    "building": ["chapel", "boathouse", "granary", "signal box", "greenhouse", "tithe barn", "toll house", "mill"],
    "task": ["sort letters", "wind clocks", "shell peas", "fold maps", "thread needles", "peel apples",
             "sharpen pencils", "count coins"],
    "key": ["amber", "cobalt", "scarlet", "ivory", "jade", "silver", "violet", "copper", "indigo", "saffron",
            "charcoal", "ochre", "teal", "maroon", "pearl", "slate"],
}


# Single needles whose wording differs from the question: (needle, question, the slot answered).
PARAPHRASES = [
    ("{name}'s spare house key is hidden beneath the {thing} by the back door.",
     "If {name} is locked out, what must be lifted to get in?", "thing"),
    ("Every Sunday morning {name} rides a bicycle to the {place} to buy fresh bread.",
     "To which spot does {name} cycle each week for a loaf?", "place"),
    ("The password to {name}'s old laptop was the word {word}.",
     "What did {name} type to unlock the aging computer?", "word"),
    ("{name} adopted a grey kitten and called it {pet}.",
     "What is the name of the cat that {name} took in?", "pet"),
    ("In the spring {name} planted a row of {plant} along the garden fence.",
     "What did {name} grow at the edge of the yard?", "plant"),
    ("The only instrument {name} ever learned to play was the {instrument}.",
     "What can {name} make music with?", "instrument"),
    ("{name} drinks a cup of {drink} before going to sleep each night.",
     "What beverage does {name} have at bedtime?", "drink"),
    ("For twenty years {name} earned a living as a {job} in the city.",
     "What was {name}'s occupation?", "job"),
    ("{name}'s favourite colour has always been {color}.",
     "Which hue does {name} like best?", "color"),
    ("{name} collects old {collectible} and keeps them in a glass cabinet.",
     "What does {name} gather and display at home?", "collectible"),
    ("Long ago {name} was taught to {task} by a patient grandmother.",
     "Which chore did {name} learn as a child?", "task"),
    ("{name} spent every summer of childhood at a cottage near {town}.",
     "Where did {name} go on holiday as a youngster?", "town"),
]

# The right fact among several alike: (needle, question); key and value vary.
MULTIKEY = [
    ("The access code for the {key} locker is {value}.", "What is the access code for the {key} locker?"),
    ("The room number of the {key} team is {value}.", "What is the room number of the {key} team?"),
    ("A ticket on the {key} train costs {value} pence.", "How many pence does a ticket on the {key} train cost?"),
    ("The {key} crate weighs exactly {value} grams.", "How many grams does the {key} crate weigh?"),
]

# Every value of one key: (needle, question).
MULTIVALUE = [
    ("One of the lucky numbers of {name} is {value}.", "What are all the lucky numbers of {name}?"),
    ("{name} once lived at house number {value}.", "At which house numbers has {name} lived?"),
    ("A safe deposit box rented by {name} is numbered {value}.",
     "What are the numbers of the safe deposit boxes {name} rents?"),
    ("{name} scored {value} points in one of the season's games.",
     "What point totals did {name} score in the season's games?"),
]

# A chain of assignments: (first, each next, question).
VARTRACK = [
    ("VAR {a} = {value}.", "VAR {b} = VAR {a}.",
     "Which variables hold the value {value}, directly or through another variable? List them all."),
    ("Let {a} be {value}.", "Let {b} be equal to {a}.",
     "Name every variable that ends up equal to {value}."),
]

# Passages of several facts, each with questions worded apart from it: (passage, [(question, slot)]).
PASSAGES = [
    ("The village of {town} lies where the {river} river bends. A weaver named {name} founded it in {year}. "
     "Traders still fill its square every {day}.",
     [("Who established {town}?", "name"), ("In what year did {town} begin?", "year"),
      ("Which river passes {town}?", "river"), ("On what day of the week is the market of {town} held?", "day")]),
    ("The schooner {ship} was built in the yard of {name} at {town}. On her first voyage she carried a cargo "
     "of {cargo}. She went down in a storm in {year}.",
     [("Who constructed the {ship}?", "name"), ("What goods were aboard the {ship} when it first sailed?", "cargo"),
      ("When was the {ship} lost at sea?", "year"), ("Where was the {ship} made?", "town")]),
    ("The inventor {name} spent eleven years building a machine that could {task}. The prototype is kept in a "
     "small museum in {town}. It was first shown to the public in {year}.",
     [("What was {name}'s device designed to do?", "task"), ("Where can one see {name}'s prototype today?", "town"),
      ("In which year was {name}'s device first exhibited?", "year")]),
    ("The {club} Society meets in an old {building} on the edge of {town}. Its president, {name}, was elected "
     "in {year}. Members pay {value} shillings a year.",
     [("Who leads the {club} Society?", "name"), ("In what kind of building does the {club} Society gather?",
                                                 "building"),
      ("How many shillings is the yearly fee of the {club} Society?", "value"),
      ("When did the {club} Society choose its current head?", "year")]),
]


class _Draw:
    """Fillers for one sample: each slot drawn from its split's half of the pool, never twice."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, split, set()

    def pick(self, slot: str) -> str:
        if slot == "name":
            pool = split_half(NAMES, self.split, "name")
        elif slot == "town":
            pool = split_half(TOWNS, self.split, "town")
        elif slot == "year":
            return str(self.rng.randrange(1700, 1900))
        elif slot == "value":
            return str(self.rng.randrange(1000, 10000))
        else:
            pool = split_half(FILLERS[slot], self.split, slot)
        choice = self.rng.choice([x for x in pool if x not in self.used] or pool)
        self.used.add(choice)
        return choice

    def fill(self, *texts: str, **given: str) -> tuple[dict, list[str]]:
        slots = dict(given)
        for text in texts:
            for name in _slots(text):
                if name not in slots:
                    slots[name] = self.pick(name)
        return slots, [t.format(**slots) for t in texts]

    def variable(self) -> str:
        while True:
            v = "".join(self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
            if v not in self.used:
                self.used.add(v)
                return v


def _slots(text: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(text) if f]


def _other_depths(rng: random.Random, n: int) -> list[float]:
    return [round(rng.uniform(0, 100), 1) for _ in range(n)]


def make_needles(task: str, split: str, depth: float, rng: random.Random):
    """(needles as (depth %, text), question, answers) of one sample: the fact asked about lies at
    `depth`; the others (distractors, further values, further links of a chain) where `rng` puts them."""
    d = _Draw(rng, split)
    if task == "paraphrase":
        needle, question, slot = rng.choice(split_half(PARAPHRASES, split, task))
        slots, (n, q) = d.fill(needle, question)
        return [(depth, n)], q, (slots[slot],)
    if task == "multikey":
        needle, question = rng.choice(split_half(MULTIKEY, split, task))
        keys = [d.pick("key") for _ in range(4)]
        values = [d.pick("value") for _ in range(4)]
        needles = [(depth, needle.format(key=keys[0], value=values[0]))]
        needles += [(x, needle.format(key=k, value=v))
                    for x, k, v in zip(_other_depths(rng, 3), keys[1:], values[1:], strict=True)]
        return needles, question.format(key=keys[0]), (values[0],)
    if task == "multivalue":
        needle, question = rng.choice(split_half(MULTIVALUE, split, task))
        name = d.pick("name")
        values = [d.pick("value") for _ in range(3)]
        needles = [(x, needle.format(name=name, value=v))
                   for x, v in zip([depth, *_other_depths(rng, 2)], values, strict=True)]
        return needles, question.format(name=name), tuple(values)
    if task == "vartrack":
        first, link, question = rng.choice(split_half(VARTRACK, split, task))
        names = [d.variable() for _ in range(3)]
        value = d.pick("value")
        texts = [first.format(a=names[0], value=value), link.format(a=names[0], b=names[1]),
                 link.format(a=names[1], b=names[2])]
        # the chain in reading order; the cell's depth holds one of its links
        depths = sorted([depth, *_other_depths(rng, 2)])
        return list(zip(depths, texts, strict=True)), question.format(value=value), tuple(names)
    if task == "qa":
        passage, questions = rng.choice(split_half(PASSAGES, split, task))
        question, slot = rng.choice(questions)
        slots, (p, q) = d.fill(passage, question)
        return [(depth, p)], q, (slots[slot],)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def build_samples(hay: Haystacks, task: str, split: str, length: int,
                  depths: tuple[float, ...] = DEPTHS) -> list[Sample]:
    """One sample per depth of the cell (task, split, length)."""
    samples = []
    for i, depth in enumerate(depths):
        # A depth of DEPTHS is the same sample whatever else is asked for (a cell can be run in parts).
        key = DEPTHS.index(depth) if depth in DEPTHS else i
        rng = random.Random(f"{SPLIT_SEED}/{task}/{split}/{length}/{key}")
        needles, question, answers = make_needles(task, split, depth, rng)
        name = "britannica" if key % 2 and hay.fits("britannica", length) else "essays"
        offset = rng.randrange(0, len(hay.ids(name)) - length + 1) if hay.fits(name, length) else 0
        samples.append(Sample(task, split, length, depth, name, hay.build(name, length, offset, needles),
                              question, answers, tuple(t for _, t in sorted(needles, key=lambda n: n[0] != depth))))
    return samples
