"""Segment mode with the library's defaults (`long_context="segments"`, nothing else) finds a needle
held out of everything the defaults were chosen on: its wording, its names and its haystack slice
appear in no task of tessera.longctx.eval, and its question shares none of its verbs or nouns but the
place's name. A regression in the defaults or the relevance signal shows here."""

from __future__ import annotations

import pytest

from tessera import SamplingParams
from tessera.longctx.eval.haystacks import essays_text
from tessera.longctx.eval.scoring import found

NEEDLE = "Behind the signal mast on Pelling Head, the old ferryman buried a tin box full of silver spoons."
QUESTION = "What did the boatman hide near the signal mast on Pelling Head?"


@pytest.mark.parametrize("depth", [0.3])
def test_default_segments_find_a_held_out_needle_past_the_window(default_llm, depth):
    llm = default_llm
    tok = llm.get_tokenizer()
    text = essays_text()
    hay = text[len(text) // 2: len(text) // 2 + 14000]  # a slice the bench's cells start elsewhere in
    cut = hay.index(". ", int(len(hay) * depth)) + 2
    conv = [{"role": "system", "content": "Answer the question at the end of the text in one sentence, using "
                                          "the text."},
            {"role": "user", "content": hay[:cut] + NEEDLE + " " + hay[cut:] + "\n\n" + QUESTION}]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False, long_context="segments")[0]
    m = out.metrics
    assert m["input_tokens"] > 1.5 * llm.engine.max_model_len  # the needle cannot be read in one window
    assert m["key_context_tokens"] < llm.engine.max_model_len
    assert found(out.text, "spoons"), out.text
    assert len(tok.encode(QUESTION)) < 20
