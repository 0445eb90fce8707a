"""The `tessera` command line: generate streams, run keeps order and reports bad lines."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import random_prompts


def tessera(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_default_model_paris():
    res = tessera("generate", "The capital of France is", "--max-tokens", "6")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(" Paris")


def test_generate_reports_bad_model_cleanly():
    res = tessera("generate", "hi", "--model", "/no/such/dir")
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_run_jsonl_in_order_with_error_records(tmp_path, model_dir):
    prompts = random_prompts([5, 30, 12, 60, 3], seed=11)
    lines = [json.dumps({"prompt_token_ids": p, "max_tokens": 4 + i, "temperature": 0, "ignore_eos": True,
                         "id": f"q{i}"}) for i, p in enumerate(prompts)]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"prompt_token_ids": [1, 2], "temperature": -3}))
    lines.insert(5, json.dumps({"prompt": "needs a tokenizer"}))  # the random model has none
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    res = tessera("run", "--input", str(inp), "--output", str(out), "--model", str(model_dir("llama")),
                  "--window", "2")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(len(lines)))
    assert "not valid JSON" in recs[2]["error"]
    assert "temperature" in recs[4]["error"]
    assert "tokenizer" in recs[5]["error"]
    good = [r for r in recs if "error" not in r]
    assert [r["id"] for r in good] == [f"q{i}" for i in range(5)]
    assert [len(r["token_ids"]) for r in good] == [4 + i for i in range(5)]
    assert json.loads(res.stdout.strip().splitlines()[-1])["errors"] == 3


def test_generate_and_run_with_long_context(tmp_path, model_dir):
    """--long-context on both commands: segment mode over an input 3x the window, sparse mode inside it."""
    from tessera.models.default_model import default_model_dir

    text = ("The sky was grey over the harbour that morning. " * 250) + "What colour was the sky?"
    (tmp_path / "long.txt").write_text(text)
    res = tessera("generate", "--prompt-file", str(tmp_path / "long.txt"), "--chat", "--long-context", "segments",
                  "--question", "What colour was the sky?", "--segment-size", "512", "--max-model-len", "1024",
                  "--max-tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()

    lines = [json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}),
             json.dumps({"prompt": text[:3000], "max_tokens": 4}),
             json.dumps({"messages": "not a list"}),
             json.dumps({"prompt": "x", "max_tokens": 4}),  # too short to hold a question: still answered
             ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    for mode in ("segments", "sparse"):
        out = tmp_path / f"{mode}.jsonl"
        res = tessera("run", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--long-context", mode,
                      "--segment-size", "512", "--max-model-len", "1024", "--sparse-top-k", "64",
                      "--model", str(default_model_dir(progress=False)))
        assert res.returncode == 0, res.stderr
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["index"] for r in recs] == [0, 1, 2, 3]
        assert "messages" in recs[2]["error"]
        if mode == "segments":
            assert "token_ids" in recs[0] and "token_ids" in recs[1] and "token_ids" in recs[3]
        else:  # 3,000 characters fit the window; the long chat does not
            assert "error" in recs[0] and "context length" in recs[0]["error"]
            assert len(recs[1]["token_ids"]) == 4
