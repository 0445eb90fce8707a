"""Exact scoring of an answer against a sample's reference strings (RULER's string_match_all).

Both sides are lower-cased, every run of characters other than letters and digits becomes one space,
and a reference counts as found when it occurs in the answer as whole words (" 4721 " is found in
"the code is 4721.", "red" is not found in "reddish"). A sample scores the fraction of its references
found: 1 or 0 for one reference, a share for several (multivalue, vartrack). A cell's accuracy is the
mean over its samples. Nothing is judged by a model.
"""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def found(answer: str, reference: str) -> bool:
    ref = normalize(reference)
    return ref.strip() != "" and ref in normalize(answer)


def score(answer: str, references: tuple[str, ...] | list[str]) -> float:
    """The fraction of `references` the answer contains (whole words, case and punctuation ignored)."""
    if not references:
        raise ValueError("a sample needs at least one reference")
    return sum(found(answer, r) for r in references) / len(references)
