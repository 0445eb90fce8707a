"""vLLM's side of `tessera bench ... --compare vllm`: a standalone runner, started with the vLLM venv's
python (`make vllm-venv`). It never imports tessera, so it runs where tessera is not installed.

    python vllm_offline.py WORKLOAD.json              # the command protocol below (what tessera uses)
    python vllm_offline.py WORKLOAD.json --standalone # run the workload's `rounds` rounds and exit

The workload file is one JSON object:

    {"mode": "throughput" | "latency",
     "model": "<HF dir>", "dtype": "auto" | "float32" | "bfloat16" | ...,
     "seed": 0, "max_model_len": null, "enforce_eager": null, "skip_tokenizer_init": null,
     "engine_kwargs": {},            # any further vllm.LLM(...) arguments
     "rounds": 1,                    # --standalone only
     # throughput:
     "prompts": [[token ids], ...], "output_lens": [int, ...], "temperature": 0.6,
     # throughput with LoRA (engine_kwargs then sets enable_lora, max_loras, max_lora_rank):
     "loras": [{"name": .., "id": 1, "path": ..}, ...],
     "lora_sets": {"uniform": [adapter index or -1, one per prompt], ...},   # `run uniform`
     # latency:
     "prompt": [token ids], "output_len": 128}

`null` leaves a setting at vLLM's own default (what a new user gets); `skip_tokenizer_init: null` turns
it on when the model directory holds no tokenizer files (tessera's random models).

Protocol: the model loads once; then every line on stdin is a command, answered by one JSON line on
stdout (and nothing else goes to stdout: vLLM's own output is sent to stderr):

    (on start)  {"event": "ready", "load_s": ..., "engine": {...the settings vLLM actually used...}}
    run         {"event": "round", "round": k, "mode": ..., "elapsed_s": ..., ...}
    run NAME    the same, each prompt with its adapter from lora_sets[NAME]
    quit / EOF  {"event": "bye"}, exit 0
    (failure)   {"event": "error", "error": "...", "traceback": "..."} (at start: then exit 1)

A throughput round runs every prompt with `SamplingParams(temperature, ignore_eos=True,
max_tokens=o)` in one `LLM.generate` (a 4-token warm-up request first, prefix cache reset, so every
round starts cold); a latency round runs one prompt greedily through `LLMEngine.step()`: time to
the first token = prefill, the remaining `output_len - 1` tokens = decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
MODES = ("throughput", "latency")


def load_workload(path: str | Path) -> dict:
    """Reads and checks a workload file; fills the optional fields with their defaults."""
    w = json.loads(Path(path).read_text())
    if not isinstance(w, dict):
        raise ValueError("the workload must be a JSON object")
    w = {"mode": "throughput", "dtype": "auto", "seed": 0, "max_model_len": None, "enforce_eager": None,
         "skip_tokenizer_init": None, "engine_kwargs": {}, "rounds": 1, **w}
    if w["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {w['mode']!r}")
    if not w.get("model"):
        raise ValueError("the workload names no model")
    if w["mode"] == "throughput":
        prompts, lens = w.get("prompts"), w.get("output_lens")
        if not isinstance(prompts, list) or not isinstance(lens, list) or len(prompts) != len(lens) or not prompts:
            raise ValueError("a throughput workload needs `prompts` and `output_lens` of one (non-zero) length")
        if not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
            raise ValueError("every prompt must be a non-empty list of token ids")
        if not all(isinstance(o, int) and o > 0 for o in lens):
            raise ValueError("every output length must be a positive integer")
        w.setdefault("temperature", 0.6)
    else:
        prompt, out = w.get("prompt"), w.get("output_len")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) for t in prompt):
            raise ValueError("a latency workload needs `prompt`, a non-empty list of token ids")
        if not isinstance(out, int) or out < 2:
            raise ValueError("a latency workload needs `output_len` >= 2")
    return w


def has_tokenizer(model: str | Path) -> bool:
    p = Path(model)
    return p.is_dir() and any((p / name).is_file() for name in TOKENIZER_FILES)


def llm_kwargs(w: dict) -> dict:
    """The `vllm.LLM(...)` arguments of a workload: only what it sets, vLLM's defaults otherwise."""
    skip = w["skip_tokenizer_init"]
    if skip is None:
        skip = not has_tokenizer(w["model"])
    kw = {"model": str(w["model"]), "dtype": w["dtype"], "seed": w["seed"], "skip_tokenizer_init": bool(skip)}
    if w["max_model_len"] is not None:
        kw["max_model_len"] = int(w["max_model_len"])
    if w["enforce_eager"] is not None:
        kw["enforce_eager"] = bool(w["enforce_eager"])
    kw.update(w["engine_kwargs"] or {})
    return kw


def engine_summary(llm) -> dict:
    """What vLLM actually runs with (its defaults resolved)."""
    import torch
    import vllm

    cfg = llm.llm_engine.vllm_config
    comp = cfg.compilation_config
    out = {"vllm_version": vllm.__version__, "torch_version": torch.__version__,
           "dtype": str(cfg.model_config.dtype), "max_model_len": cfg.model_config.max_model_len,
           "enforce_eager": cfg.model_config.enforce_eager,
           "compilation_mode": str(getattr(comp, "mode", None)), "compilation_backend": getattr(comp, "backend", None),
           "max_num_seqs": cfg.scheduler_config.max_num_seqs,
           "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
           "block_size": cfg.cache_config.block_size,
           "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
           "kv_cache_memory_bytes": cfg.cache_config.kv_cache_memory_bytes,
           "num_gpu_blocks": cfg.cache_config.num_gpu_blocks,
           "skip_tokenizer_init": cfg.model_config.skip_tokenizer_init,
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:  # vLLM's CPU attention and the kernel ISA it picks for this dtype / block / head size (private API)
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        mc = cfg.model_config
        head = mc.get_head_size()
        out["attention"] = {"backend_cls": str(current_platform.get_attn_backend_cls(None, _Sel(), None)),
                            "isa": _get_attn_isa(mc.dtype, cfg.cache_config.block_size, head), "head_size": head}
    except Exception as e:
        out["attention"] = f"unknown ({type(e).__name__}: {e})"
    out["env"] = {k: v for k, v in os.environ.items()
                  if k.startswith(("VLLM_CPU", "OMP_", "KMP_")) or k in ("LD_PRELOAD",)}
    return out


class _Sel:
    """Stands in for vLLM's AttentionSelectorConfig when asking which CPU backend a plain model gets."""

    use_sparse = False
    use_mla = False


def _warm_up(llm, skip_tokenizer: bool) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])],
                 SamplingParams(max_tokens=4, ignore_eos=True, detokenize=not skip_tokenizer), use_tqdm=False)


def lora_requests(w: dict, lora_set: str | None):
    """One vllm LoRARequest (or None) per prompt, from the workload's lora_sets[lora_set]."""
    if lora_set is None:
        return None
    from vllm.lora.request import LoRARequest

    reqs = [LoRARequest(a["name"], int(a["id"]), a["path"]) for a in w["loras"]]
    return [reqs[k] if k >= 0 else None for k in w["lora_sets"][lora_set]]


def throughput_round(llm, w: dict, skip_tokenizer: bool, lora_set: str | None = None) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
    params = [SamplingParams(temperature=w["temperature"], ignore_eos=True, max_tokens=o,
                             detokenize=not skip_tokenizer) for o in w["output_lens"]]
    loras = lora_requests(w, lora_set)
    _warm_up(llm, skip_tokenizer)
    llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - t0
    produced = [len(o.outputs[0].token_ids) for o in outs]
    if produced != list(w["output_lens"]):
        raise RuntimeError(f"vLLM produced {sum(produced)} tokens, expected {sum(w['output_lens'])}")
    return {"elapsed_s": elapsed, "output_tokens": sum(produced),
            "prompt_tokens": sum(len(p) for p in w["prompts"])}


def latency_round(llm, w: dict, skip_tokenizer: bool, rid: str) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    n_out = w["output_len"]
    _warm_up(llm, skip_tokenizer)
    llm.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True, detokenize=not skip_tokenizer)
    t0 = time.perf_counter()
    eng.add_request(rid, TokensPrompt(prompt_token_ids=w["prompt"]), params)
    first = None
    tokens = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens = len(out.outputs[0].token_ids)
            if first is None and tokens >= 1:
                first = time.perf_counter()
    end = time.perf_counter()
    if tokens != n_out or first is None:
        raise RuntimeError(f"vLLM produced {tokens} tokens, expected {n_out}")
    prefill_s, decode_s = first - t0, end - first
    return {"prefill_s": prefill_s, "decode_s": decode_s, "prefill_tok_s": len(w["prompt"]) / prefill_s,
            "decode_tok_s": (n_out - 1) / decode_s, "prompt_len": len(w["prompt"]), "output_len": n_out}


class Runner:
    def __init__(self, w: dict):
        self.w = w
        self.kwargs = llm_kwargs(w)
        self.rounds = 0
        self.llm = None

    def start(self) -> dict:
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**self.kwargs)
        load_s = time.perf_counter() - t0
        return {"event": "ready", "load_s": load_s, "llm_kwargs": self.kwargs, "engine": engine_summary(self.llm)}

    def run_round(self, lora_set: str | None = None) -> dict:
        self.rounds += 1
        skip = self.kwargs["skip_tokenizer_init"]
        if self.w["mode"] == "throughput":
            res = throughput_round(self.llm, self.w, skip, lora_set)
        else:
            res = latency_round(self.llm, self.w, skip, f"latency-{self.rounds}")
        return {"event": "round", "round": self.rounds, "mode": self.w["mode"], **res}


def _error(e: BaseException) -> dict:
    return {"event": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def serve_commands(runner, lines, emit) -> int:
    """The command loop: one answer per command line; returns the exit code."""
    for line in lines:
        cmd = line.strip()
        if not cmd:
            continue
        if cmd == "quit":
            break
        word, _, arg = cmd.partition(" ")
        if word != "run":
            emit({"event": "error", "error": f"unknown command {cmd!r} (run [LORA_SET] | quit)"})
            continue
        try:
            emit(runner.run_round(arg.strip() or None) if arg.strip() else runner.run_round())
        except Exception as e:  # reported to the parent, which decides; the runner stays up
            emit(_error(e))
    emit({"event": "bye"})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", help="the workload JSON file")
    ap.add_argument("--standalone", action="store_true", help="run the workload's `rounds` rounds, then exit")
    args = ap.parse_args(argv)

    # The protocol owns stdout; everything else (vLLM's logs, its engine process) writes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    try:
        runner = Runner(load_workload(args.workload))
        emit(runner.start())
    except Exception as e:
        emit(_error(e))
        return 1
    if args.standalone:
        for _ in range(int(runner.w["rounds"])):
            emit(runner.run_round())
        emit({"event": "bye"})
        return 0
    return serve_commands(runner, sys.stdin, emit)


if __name__ == "__main__":
    sys.exit(main())
