"""`tessera bench offload`: decode speed of a model larger than its weight budget, against the bound that
the disk sets, and against HF Accelerate's disk offload on the same model, budget and prompts.

A decode step must read every streamed byte once, so tok/s <= batch x bandwidth / streamed bytes per
step; at large batches compute may bound it first (batch / the time of one step's matmuls at the
measured GEMM rate). With --quantization the streamed layers are quantized (fewer bytes per step, lossy) and
the default budget is half the model as tessera holds it quantized; Accelerate, which streams the bf16
checkpoint, keeps half of that (--dense-too adds tessera's dense streaming at that budget to the same run).
--weight-memory gives every system of the run that one budget: tessera quantized, tessera dense and
Accelerate, the same-budget comparison.
The bench builds a random-weight Llama-shaped model (or takes --model), drops the
page cache (as root: /proc/sys/vm/drop_caches; otherwise POSIX_FADV_DONTNEED over the model's and the
pack's files, and it says which), measures the sequential read bandwidth of the layer pack with the
streamer's own read path, then decodes each batch size. The systems run one after the other, never
together: tessera in this process (its reader stopped before Accelerate starts), Accelerate in its
own venv's process (`make accelerate-venv`).

With --device cuda the streamed layers come from pinned host memory (tessera.offload.device_streamer): the
link measured is the pinned host -> device copy, the default budget a quarter of the checkpoint, and each
run reports the H2D rate achieved while decoding (streamed bytes / decode time) against it. Unmeasured so far.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tessera.bench.compare import REPO_ROOT, cpu_flags, find_venv_python

RUNNER = Path(__file__).resolve().parent / "external" / "accelerate_offload.py"
DEFAULT_ACCELERATE_VENV = REPO_ROOT / ".venv-accelerate"


def add_offload_args(sub) -> None:
    from tessera.config import add_engine_args

    p = sub.add_parser("offload", help="weight streaming: decode tok/s under --weight-memory vs the disk's bound "
                                       "(and HF Accelerate's disk offload)")
    p.add_argument("--model-size", default="4.5GB", help="size of the random Llama-7B-shaped model built when no "
                   "--model is given (bf16, layers added until it is reached)")
    p.add_argument("--scratch-dir", default=None, help="where the built model, the layer pack and Accelerate's "
                   "offload folder go (default: a temporary directory, removed at the end)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--output-lens", type=int, nargs="+", default=[16, 8], help="tokens per sequence, per batch size")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--compare", choices=("accelerate",), default=None)
    p.add_argument("--accelerate-python", default=None,
                   help="python of the Accelerate venv (default $TESSERA_ACCELERATE_PYTHON, else "
                        ".venv-accelerate/bin/python; `make accelerate-venv`)")
    p.add_argument("--accelerate-page-cache", nargs="+", choices=("cold", "warm"), default=["cold"],
                   help="cold: Accelerate's page cache is emptied before each step (untimed; needs root), so it "
                        "reads from disk as a model larger than memory must, the same-budget comparison; warm: "
                        "left alone (its memory-mapped reads then come from a page cache holding the model)")
    p.add_argument("--dense-too", action="store_true",
                   help="with --quantization: also stream the model in the compute dtype (budget: half the "
                        "checkpoint, or --weight-memory), in the same run, to compare bytes per step")
    p.add_argument("--json-out", default=None)
    add_engine_args(p)


# -- the machine ---------------------------------------------------------------------------------


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def drop_page_cache(files: list[Path]) -> str:
    """Empties the page cache of `files`: the whole cache as root, else fadvise per file. Returns which."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) per file"


def pack_bandwidth(streamer, passes: int = 3) -> list[float]:
    """Bytes/s of each of `passes` reads of the whole layer pack, region by region, with the streamer's own
    reader (O_DIRECT: the page cache is emptied once, before the first)."""
    from tessera.offload.layer_pack import region_offset
    from tessera.offload.streamer import RegionReader, aligned_buffer

    buf = aligned_buffer(streamer.region_bytes)
    reader = RegionReader(streamer.path)
    rates = []
    try:
        drop_page_cache([streamer.path])
        for _ in range(passes):
            t0 = time.perf_counter()
            nbytes = 0
            for k, layout in enumerate(streamer.layouts):
                reader.read(buf, region_offset(k, streamer.region_bytes), layout.region_bytes)
                nbytes += layout.region_bytes
            rates.append(nbytes / (time.perf_counter() - t0))
    finally:
        reader.close()
    return rates


def gemm_rate(dtype: torch.dtype, m: int, k: int, n: int, reps: int = 5) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(a, b)
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


# -- tessera ---------------------------------------------------------------------------------------


def run_tessera(llm, prompts: list[list[int]], output_len: int) -> dict:
    from tessera import SamplingParams

    eng = llm.engine
    stats = eng.weight_streamer.stats
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    cached0 = _meminfo("Cached")
    t = time.perf_counter()
    ids = [eng.add_request(None, params, prompt_token_ids=p) for p in prompts]
    eng.step()  # the prompts (one step in throughput mode) and the first tokens
    first = time.perf_counter()
    read0, wait0, bytes0 = stats.read_s, stats.wait_s, stats.bytes_read
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    end = time.perf_counter()
    assert all(len(done[r].outputs[0].token_ids) == output_len for r in ids)
    return {"batch": len(prompts), "output_len": output_len, "prefill_s": round(first - t, 3),
            "decode_s": round(end - first, 3),
            "decode_tok_s": round(len(prompts) * (output_len - 1) / (end - first), 4),
            "decode_read_s": round(stats.read_s - read0, 3), "decode_wait_s": round(stats.wait_s - wait0, 3),
            "decode_bytes_read": stats.bytes_read - bytes0,
            "page_cache_growth_bytes": _meminfo("Cached") - cached0,
            "first_tokens": done[ids[0]].outputs[0].token_ids[:8]}


def run_accelerate(python: Path, workload: dict, scratch: Path) -> dict:
    path = scratch / "accelerate-workload.json"
    path.write_text(json.dumps(workload))
    log = scratch / "accelerate.log"
    cached0 = _meminfo("Cached")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(log, "w") as err:
        out = subprocess.run([str(python), str(RUNNER), str(path)], stdout=subprocess.PIPE, stderr=err, text=True,
                             env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the Accelerate runner failed (code {out.returncode}); log {log}:\n"
                           + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["page_cache_growth_bytes"] = _meminfo("Cached") - cached0
    result["log"] = str(log)
    return result


# -- the bench -------------------------------------------------------------------------------------


def dense_pass(kw: dict, dense_budget: int) -> dict:
    """--dense-too's engine: the same, on the checkpoint's own weights (no quantization, so neither a
    quantized LM head nor int8 activations), under the given budget or half the checkpoint."""
    return {**kw, "quantization": None, "quantize_lm_head": False, "activation_bits": None,
            "weight_memory": kw["weight_memory"] or dense_budget}


def accelerate_budget(kw: dict, dense_budget: int, tessera_budget: int) -> int:
    """Accelerate's weight memory: the one given (--weight-memory: every system gets it), else half the
    bf16 checkpoint beside a quantized tessera (each at half the model as it stores it), else tessera's."""
    if kw["weight_memory"] is not None:
        from tessera.config import parse_memory_size

        return parse_memory_size(kw["weight_memory"])
    return dense_budget if kw["quantization"] else tessera_budget


def quantized_budget(model_dir: Path, kw: dict) -> int:
    """Half the model as tessera streams it: with --quantization, its quantized weight bytes (the bf16
    checkpoint's half would hold a 4-bit model whole, and nothing would stream)."""
    from tessera.config import EngineConfig, ModelConfig
    from tessera.offload.streamed_model import WeightSource, weight_bytes

    spec = EngineConfig(**{**kw, "weight_memory": None}).quant_spec()
    return weight_bytes(ModelConfig.from_dir(model_dir), getattr(torch, kw["dtype"]), WeightSource(quant=spec)) // 2


def tessera_pass(kw: dict, args, workloads: list[dict]) -> dict:
    """Load tessera under kw's weight budget, measure the pack's read bandwidth, decode each workload."""
    from tessera import LLM

    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    llm = LLM(**{**kw, "max_num_seqs": max(kw["max_num_seqs"], max(args.batch_sizes))}, progress=True)
    load_s = time.perf_counter() - t0
    eng = llm.engine
    plan, streamer = eng.model.weight_plan, eng.weight_streamer
    if streamer is None:
        raise SystemExit(f"weight_memory {kw['weight_memory']} holds the whole model: nothing streams")
    cfg = eng.model_config
    load_peak = _status("VmHWM") - rss0
    on_gpu = eng.device.type == "cuda"
    # The link the streamed bytes cross: on a GPU pinned host memory -> device (the streamer's own copies,
    # timed with CUDA events), else the disk (the pack read with the streamer's own reader).
    rates = streamer.h2d_bandwidth() if on_gpu else pack_bandwidth(streamer)
    bandwidth = max(rates)
    step_bytes = plan.streamed_bytes_per_step
    out = {"quantization": kw.get("quantization"), "dtype": str(eng.dtype).removeprefix("torch."),
           "weight_memory": plan.budget, "plan": plan.describe(), "resident_weight_bytes": plan.resident_bytes,
           "streamed_layers": len(plan.streamed), "num_layers": plan.num_layers,
           "streamed_bytes_per_step": step_bytes, "load_s": round(load_s, 1), "io_mode": "",
           "link": "pinned host -> cuda (H2D copies)" if on_gpu else "disk (layer pack reads)",
           "bandwidth_gb_s": round(bandwidth / 1e9, 3), "bandwidth_passes_gb_s": [round(r / 1e9, 3) for r in rates],
           "rss_before_load_bytes": rss0, "load_peak_rss_growth_bytes": load_peak, "runs": []}
    from tessera.models.llama import DecoderLayer

    with torch.device("meta"):
        layer_params = sum(p.numel() for p in DecoderLayer(cfg).parameters())
    out["compute_note"] = ("compute bound: batch / (2 x parameters x batch FLOPs at the dense GEMM rate measured "
                           "at [batch, hidden] x [hidden, intermediate]), attention not counted"
                           + ("; quantized linears also dequantize (batch >= 32) or use the bit-plane kernel, "
                              "so theirs is lower" if kw.get("quantization") else ""))
    rates_by_batch = {b: gemm_rate(eng.dtype, b, cfg.hidden_size, cfg.intermediate_size) for b in args.batch_sizes}
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the decodes, not the measurements
    except OSError:
        out["peak_rss_note"] = "could not reset VmHWM: the decode peaks include loading and measuring"
    for w in workloads:
        batch, prompts, out_len = w["batch"], w["prompts"], w["output_len"]
        rate = rates_by_batch[batch]
        step_compute_s = batch * (cfg.num_layers * 2 * layer_params + 2 * cfg.hidden_size * cfg.vocab_size) / rate
        drop_page_cache([streamer.path])
        run = run_tessera(llm, prompts, out_len)
        # The link read faster while decoding than alone in some runs (a shared virtual disk): the bound
        # takes the faster of the two, the reader's own rate during the decode included.
        reader_rate = run["decode_bytes_read"] / max(run["decode_read_s"], 1e-9)
        link = bandwidth if on_gpu else max(bandwidth, reader_rate)  # GPU copies are async: no per-copy time
        if on_gpu:  # the H2D rate achieved while decoding, against the pinned copy rate measured above
            achieved = run["decode_bytes_read"] / run["decode_s"]
            run.update({"h2d_achieved_gb_s": round(achieved / 1e9, 3),
                        "h2d_fraction_of_pinned": round(achieved / bandwidth, 3)})
        disk_bound = batch * link / step_bytes
        compute_bound = batch / step_compute_s
        bound = min(disk_bound, compute_bound)
        run.update({"link_gb_s_for_bound": round(link / 1e9, 3),
                    "disk_bound_tok_s": round(disk_bound, 4), "compute_bound_tok_s": round(compute_bound, 4),
                    "gemm_gflop_s": round(rate / 1e9, 1),
                    "fraction_of_bound": round(run["decode_tok_s"] / bound, 3),
                    "fraction_of_disk_bound": round(run["decode_tok_s"] / disk_bound, 3),
                    "decode_read_gb_s": round(reader_rate / 1e9, 3),
                    "reader_busy_fraction": round(run["decode_read_s"] / run["decode_s"], 3),
                    "peak_rss_growth_bytes": _status("VmHWM") - rss0, "rss_bytes": _status("VmRSS")})
        out["runs"].append(run)
        print(json.dumps({"quantization": kw.get("quantization"), **{k: v for k, v in run.items()
                                                                     if k != "first_tokens"}}), flush=True)
    out["io_mode"] = streamer.stats.io_mode
    out["tessera_peak_rss_bytes"] = _status("VmHWM")
    out["tessera_decode_peak_rss_growth_bytes"] = _status("VmHWM") - rss0
    llm.close()
    del llm, eng, streamer
    gc.collect()
    return out


def bench_offload(args) -> dict:
    from tessera.bench.offload_model import LlamaShape, checkpoint_bytes, write_random_llama
    from tessera.config import EngineConfig, ModelConfig, engine_kwargs, parse_memory_size

    if len(args.output_lens) != len(args.batch_sizes):
        raise SystemExit("--output-lens needs one value per --batch-sizes value")
    accel_python = None
    if args.compare == "accelerate":
        accel_python = find_venv_python(args.accelerate_python, "TESSERA_ACCELERATE_PYTHON", DEFAULT_ACCELERATE_VENV,
                                        "Accelerate's python {path} was not found: run `make accelerate-venv`, or "
                                        "pass --accelerate-python")
    own_scratch = args.scratch_dir is None
    scratch = Path(args.scratch_dir or tempfile.mkdtemp(prefix="tessera-bench-offload-"))
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TESSERA_OFFLOAD_DIR"] = str(scratch / "packs")
    kw = engine_kwargs(args)
    kw["dtype"] = "bfloat16" if kw["dtype"] == "auto" else kw["dtype"]
    try:
        t0 = time.perf_counter()
        if kw["model"] is None:
            shape = LlamaShape().with_size(parse_memory_size(args.model_size), 2)
            kw["model"] = str(write_random_llama(scratch / "model", shape, torch.bfloat16))
        build_s = time.perf_counter() - t0
        model_dir = Path(kw["model"])
        size = checkpoint_bytes(model_dir)
        dense_budget = size // 2  # the budget rule: half the checkpoint (Accelerate's, and dense tessera's)
        passes = [dict(kw)]
        on_gpu = EngineConfig(**{**kw, "weight_memory": None}).resolve_device().type == "cuda"
        if kw["weight_memory"] is None and on_gpu:
            passes[0]["weight_memory"] = size // 4  # the GPU case: a quarter of the model on the device
        elif kw["weight_memory"] is None:
            passes[0]["weight_memory"] = quantized_budget(model_dir, kw) if kw["quantization"] else dense_budget
        if args.dense_too and kw["quantization"]:
            passes.append(dense_pass(kw, dense_budget))
        cfg = ModelConfig.from_dir(model_dir)
        rng = random.Random(0)
        workloads = []
        for batch, out_len in zip(args.batch_sizes, args.output_lens, strict=True):
            prompts = [[rng.randint(3, cfg.vocab_size - 1) for _ in range(args.prompt_len)] for _ in range(batch)]
            workloads.append({"batch": batch, "prompt_len": args.prompt_len, "output_len": out_len,
                              "prompts": prompts})
        cache_method = drop_page_cache(list(model_dir.glob("*.safetensors")))
        result = {"bench": "offload", "model": str(model_dir), "checkpoint_bytes": size, "build_s": round(build_s, 1),
                  "page_cache": cache_method, "threads": torch.get_num_threads(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_flags()}
        # The first pass's figures at the top level (as before); a dense pass beside a quantized one under "dense".
        result.update(tessera_pass(passes[0], args, workloads))
        if len(passes) > 1:
            drop_page_cache(list(model_dir.glob("*.safetensors")))
            result["dense"] = tessera_pass(passes[1], args, workloads)
        if accel_python is not None:
            drop_page_cache(list(model_dir.glob("*.safetensors")))
            acc = run_accelerate(accel_python, {
                "model": str(model_dir), "dtype": kw["dtype"],
                "weight_memory": accelerate_budget(kw, dense_budget, result["weight_memory"]),
                "offload_folder": str(scratch / "accelerate-offload"), "runs": workloads,
                "threads": torch.get_num_threads(), "page_cache": args.accelerate_page_cache}, scratch)
            result["accelerate"] = acc
            for ours in result["runs"] + result.get("dense", {}).get("runs", []):
                for theirs in acc["runs"]:
                    if theirs["batch"] == ours["batch"]:
                        mode = theirs["page_cache"]
                        ours[f"accelerate_{mode}_decode_tok_s"] = theirs["decode_tok_s"]
                        ours[f"speedup_vs_accelerate_{mode}"] = round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2)
        return result
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            shutil.rmtree(scratch / "accelerate-offload", ignore_errors=True)


if __name__ == "__main__":
    sys.exit("run it as `tessera bench offload`")
