"""`tessera run`'s runner: what each output record holds."""

from __future__ import annotations

import json

import pytest

from tessera import LLM, SamplingParams
from tessera.batch_runner import run_file, run_file_long_context
from tessera.longctx import SparseConfig


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir("llama")), progress=False)


LINES = [
    {"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 2},
    {"prompt_token_ids": [9, 10, 11], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
    {"prompt_token_ids": [12, 13], "max_tokens": 3, "temperature": 1.0, "seed": 1, "n": 2, "ignore_eos": True,
     "logprobs": 0},
]


def run(llm, tmp_path, long_context=None) -> list[dict]:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    if long_context is None:
        stats = run_file(llm, inp, out, {}, window=8, progress=False)
    else:
        stats = run_file_long_context(llm, inp, out, {}, 8, long_context, progress=False)
    assert stats["errors"] == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("long_context", [None, SparseConfig()], ids=["plain", "sparse"])
def test_requested_logprobs_are_written(llm, tmp_path, long_context):
    recs = run(llm, tmp_path, long_context)
    ref = llm.generate([line["prompt_token_ids"] for line in LINES],
                       [SamplingParams(**{k: v for k, v in line.items() if k != "prompt_token_ids"}) for line in LINES],
                       use_tqdm=False)
    first, plain, sampled = recs
    assert "logprobs" not in plain and "cumulative_logprob" not in plain
    for rec, want in ((first, ref[0].outputs[0]), *zip(sampled["outputs"], ref[2].outputs, strict=True)):
        assert rec["token_ids"] == want.token_ids
        assert len(rec["logprobs"]) == len(rec["token_ids"])
        for tok, entry, ref_entry in zip(rec["token_ids"], rec["logprobs"], want.logprobs, strict=True):
            assert [e["rank"] for e in entry] == sorted(e["rank"] for e in entry)  # most likely first
            assert {e["token_id"]: e["logprob"] for e in entry} == pytest.approx(
                {t: lp.logprob for t, lp in ref_entry.items()})
            assert tok in {e["token_id"] for e in entry}
        assert rec["cumulative_logprob"] == pytest.approx(want.cumulative_logprob)
    assert len(first["logprobs"][0]) >= 2  # top-2 (plus the chosen token, when not among them)


def test_requested_prompt_logprobs_are_written(llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompt = [5, 6, 7, 8, 9]
    inp.write_text(json.dumps({"prompt_token_ids": prompt, "max_tokens": 0, "prompt_logprobs": 1}) + "\n")
    assert run_file(llm, inp, out, {}, window=8, progress=False)["errors"] == 0
    rec = json.loads(out.read_text())
    assert rec["token_ids"] == [] and rec["finish_reason"] == "length" and "logprobs" not in rec
    ref = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0].prompt_logprobs
    assert rec["prompt_logprobs"][0] is None and len(rec["prompt_logprobs"]) == len(prompt)
    for tok, entry, ref_entry in zip(prompt[1:], rec["prompt_logprobs"][1:], ref[1:], strict=True):
        assert tok in {e["token_id"] for e in entry}
        assert {e["token_id"]: e["logprob"] for e in entry} == pytest.approx(
            {t: lp.logprob for t, lp in ref_entry.items()})
