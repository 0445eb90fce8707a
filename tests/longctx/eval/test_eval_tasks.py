"""The RULER-style task set: the split fixed by seed keeps held-out wording and fillers apart from the
development set's, every sample holds its answer where its depth says, paraphrased needles share no
content word with their question, and multi-key distractors share the question's words but not its
answer."""

from __future__ import annotations

import re

import pytest

from tessera.errors import InvalidRequestError
from tessera.longctx.eval.haystacks import Haystacks, britannica_text, essays_text
from tessera.longctx.eval.tasks import (
    DEPTHS,
    MULTIKEY,
    NAMES,
    PARAPHRASES,
    SPLITS,
    TASKS,
    build_samples,
    make_needles,
    split_half,
)


@pytest.fixture(scope="module")
def hay():
    from tessera.models.default_model import default_model_dir
    from tessera.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir(progress=False))
    # shorter slices of both haystacks keep the test fast; the bench tokenizes them whole
    return Haystacks(tok, {"essays": essays_text()[:40000], "britannica": britannica_text()[:40000]})


def test_the_split_is_fixed_by_seed_and_disjoint():
    for items in (NAMES, PARAPHRASES, MULTIKEY, list(range(7))):
        dev, held = split_half(items, "dev", "x"), split_half(items, "heldout", "x")
        assert not set(map(str, dev)) & set(map(str, held)) and sorted(map(str, dev + held)) == sorted(map(str, items))
        assert dev == split_half(items, "dev", "x") and len(dev) == len(items) // 2
    assert split_half(NAMES, "dev", "name") != split_half(NAMES, "dev", "other salt")
    with pytest.raises(ValueError):
        split_half(NAMES, "test", "x")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_held_out_samples_share_no_wording_or_filler_with_development_ones():
    import random

    def templates(task: str, split: str) -> set[str]:
        used = set()
        for i in range(40):
            needles, question, _ = make_needles(task, split, 50.0, random.Random(f"t/{i}"))
            used.add(re.sub(r"[A-Z0-9][\w']*", "_", question))  # the question's wording, fillers blanked
        return used

    for task in TASKS:
        assert not templates(task, "dev") & templates(task, "heldout"), task
    dev_names = {n for n in NAMES if n in split_half(NAMES, "dev", "name")}
    for i in range(40):
        _, question, _ = make_needles("paraphrase", "heldout", 50.0, random.Random(i))
        assert not any(n in question for n in dev_names)


STOP = {"what", "which", "where", "when", "does", "did", "that", "with", "from", "have", "must", "could", "the"}


def test_paraphrased_needles_share_no_content_word_with_their_question():
    for needle, question, _ in PARAPHRASES:
        q = _words(question.replace("{name}", "")) - STOP
        n = _words(needle.replace("{name}", ""))
        assert not {w for w in q & n if len(w) > 3}, (needle, question)


def test_multikey_distractors_share_the_question_words_but_not_its_answer():
    import random

    for i in range(10):
        needles, question, (answer,) = make_needles("multikey", "dev", 30.0, random.Random(i))
        assert len(needles) == 4 and needles[0][0] == 30.0 and answer in needles[0][1]
        q = _words(question)
        for _, text in needles[1:]:
            assert answer not in text
            assert len(q & _words(text)) >= len(q & _words(needles[0][1])) - 2  # all but the key alike


@pytest.mark.parametrize("task", TASKS)
def test_samples_hold_their_answers_at_their_depth(hay, task):
    length = 4096
    for split in SPLITS:
        samples = build_samples(hay, task, split, length)
        assert [s.depth for s in samples] == list(DEPTHS) and len(DEPTHS) >= 10
        assert {s.haystack for s in samples} == {"essays", "britannica"}
        for s in samples:
            n = len(hay.tok.encode(s.context, add_special_tokens=False))
            assert abs(n - length) < 40, n
            assert all(a in s.context for a in s.answers)
            conv = s.conversation()
            assert conv[-1]["content"].endswith("\n\n" + s.question) and s.split == split
            assert all(f in s.context for f in s.facts) and all(any(a in f for f in s.facts) for a in s.answers)
            if task in ("paraphrase", "qa", "multikey"):
                at = len(hay.tok.encode(s.context[: s.context.index(s.facts[0])], add_special_tokens=False))
                assert abs(at - length * s.depth / 100) < 350, (s.depth, at)  # a sentence back at most
    # the same cell twice is the same samples
    assert build_samples(hay, task, "dev", length)[:2] == build_samples(hay, task, "dev", length)[:2]


def test_needles_go_between_sentences(hay):
    text = hay.build("britannica", 2000, 0, [(50.0, "NEEDLE ONE."), (50.0, "NEEDLE TWO.")])
    before = text[: text.index("NEEDLE ONE.")].rstrip()
    assert before.endswith((".", "?", "!")) and text.index("NEEDLE ONE.") < text.index("NEEDLE TWO.")
    with pytest.raises(InvalidRequestError, match="has"):
        hay.build("britannica", 10**6, 0, [])
