"""Exact scoring: whole words, case and punctuation ignored, a share per reference found."""

from __future__ import annotations

import pytest

from tessera.longctx.eval.scoring import found, normalize, score


def test_a_reference_counts_only_as_whole_words():
    assert found("The access code is 4721.", "4721")
    assert not found("The access code is 47210.", "4721")
    assert found("She plays the CELLO, mostly.", "cello") and not found("violoncellos", "cello")
    assert found("chamomile-tea before bed", "chamomile tea")
    assert not found("red", "reddish") and not found("reddish", "red")
    assert normalize("  A,  b!\nC ") == " a b c "


def test_several_references_score_the_share_found():
    refs = ("6994", "8172", "4885")
    assert score("6994, 8172 and 4885", refs) == 1.0
    assert score("the lucky numbers are 8172 and 1234", refs) == pytest.approx(1 / 3)
    assert score("", refs) == 0.0
    assert score("It was the tortoise.", ("tortoise",)) == 1.0
    with pytest.raises(ValueError):
        score("anything", ())
