"""llama.cpp's side of `tessera bench latency --compare llama.cpp`: a standalone runner started with the
python of the llama-cpp-python venv (`make llamacpp-venv`). It never imports tessera.

    python llamacpp_latency.py WORKLOAD.json

The workload file is one JSON object:

    {"mode": "latency", "model": "<file.gguf>", "prompt": [token ids], "output_len": 128,
     "n_threads": 2, "n_ctx": 2048, "seed": 0}
    {"mode": "perplexity", "model": "<file.gguf>", "windows": [[token ids], ...], "n_threads": 2, "n_ctx": 2048}

Protocol (as tessera/bench/external/vllm_offline.py): the model loads once, then each stdin line is a
command answered by one JSON line on stdout (llama.cpp's own output goes to stderr):

    (on start)  {"event": "ready", "load_s": ..., "engine": {...}}
    run         {"event": "round", "round": k, "prefill_tok_s": ..., "decode_tok_s": ..., ...}
    quit / EOF  {"event": "bye"}
    (failure)   {"event": "error", "error": "...", "traceback": "..."}

Perplexity (`tessera bench perplexity --compare llama.cpp`): each window is evaluated from an empty
context with every position's logits kept, and each token after the window's first is scored by its
log-softmax there; a round answers {"nll": sum of -log p, "scored": count} (the scheme of tessera's
side, on the same token ids, so the two perplexities compare).

A latency round clears the context, evaluates the prompt and takes the greedy first token (prefill = prompt
tokens / that time), then evaluates and greedily samples `output_len - 1` more tokens one at a time,
never stopping at EOS (decode = those tokens / their time): the same measurement as tessera's side.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def emit(msg: dict) -> None:
    sys.__stdout__.write(json.dumps(msg) + "\n")
    sys.__stdout__.flush()


def score_windows(llm, windows: list[list[int]]) -> dict:
    import numpy as np

    nll, scored = 0.0, 0
    t = time.perf_counter()
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # position i predicts token i + 1
        top = logits.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
        nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        scored += len(ids) - 1
    return {"nll": nll, "scored": scored, "elapsed_s": time.perf_counter() - t}


def main(path: str) -> int:
    sys.stdout = sys.stderr  # keep stdout for the protocol
    try:
        with open(path) as f:
            w = json.load(f)
        from llama_cpp import Llama, __version__

        t0 = time.perf_counter()
        threads = int(w.get("n_threads") or os.cpu_count() or 1)
        perplexity = w["mode"] == "perplexity"
        longest = max(map(len, w["windows"])) if perplexity else len(w["prompt"])
        llm = Llama(model_path=w["model"], n_ctx=int(w.get("n_ctx") or 2048), n_threads=threads,
                    n_threads_batch=threads, n_batch=max(512, longest), n_ubatch=max(512, longest),
                    seed=int(w.get("seed", 0)), logits_all=perplexity, verbose=False)
        emit({"event": "ready", "load_s": time.perf_counter() - t0,
              "engine": {"llama_cpp_python": __version__, "n_threads": threads, "n_ctx": llm.n_ctx(),
                         "model": w["model"]}})
    except Exception as e:  # noqa: BLE001 - reported over the protocol
        emit({"event": "error", "error": repr(e), "traceback": traceback.format_exc()})
        return 1
    rnd = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "run":
            continue
        try:
            if perplexity:
                emit({"event": "round", "round": rnd, **score_windows(llm, w["windows"])})
                rnd += 1
                continue
            prompt, out_len = list(w["prompt"]), int(w["output_len"])
            llm.reset()  # eval() drops the cache past n_tokens, so the prompt is computed afresh
            t = time.perf_counter()
            llm.eval(prompt)
            tok = llm.sample(top_k=1, temp=0.0)
            first = time.perf_counter()
            for _ in range(out_len - 1):
                llm.eval([tok])
                tok = llm.sample(top_k=1, temp=0.0)
            end = time.perf_counter()
            emit({"event": "round", "round": rnd, "prefill_tok_s": len(prompt) / (first - t),
                  "decode_tok_s": (out_len - 1) / (end - first), "elapsed_s": end - t})
            rnd += 1
        except Exception as e:  # noqa: BLE001
            emit({"event": "error", "error": repr(e), "traceback": traceback.format_exc()})
            return 1
    emit({"event": "bye"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
