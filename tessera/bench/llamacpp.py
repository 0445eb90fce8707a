"""llama.cpp beside tessera (`tessera bench latency --compare llama.cpp`): llama-cpp-python lives in its
own venv (`make llamacpp-venv`, built from source for this CPU); tessera only starts
tessera/bench/external/llamacpp_latency.py with that venv's python and speaks its JSON protocol."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tessera.bench.compare import REPO_ROOT, ExternalEngineMissing, ExternalRunner, find_venv_python

LLAMACPP_PYTHON_ENV = "TESSERA_LLAMACPP_PYTHON"
DEFAULT_LLAMACPP_VENV = REPO_ROOT / ".venv-llamacpp"
RUNNER = Path(__file__).parent / "external" / "llamacpp_latency.py"


def find_llamacpp_python(explicit: str | os.PathLike | None = None) -> Path:
    """`--llamacpp-python`, else $TESSERA_LLAMACPP_PYTHON, else <repo>/.venv-llamacpp/bin/python."""
    return find_venv_python(explicit, LLAMACPP_PYTHON_ENV, DEFAULT_LLAMACPP_VENV,
                            "llama-cpp-python's python {path} was not found: run `make llamacpp-venv`, or pass "
                            f"--llamacpp-python / set {LLAMACPP_PYTHON_ENV}")


def gguf_for(model: str | None) -> Path:
    """The GGUF file llama.cpp reads: the model if it is one, the default model's file if none."""
    if model is None:
        from tessera.models.default_model import default_model_gguf

        return Path(default_model_gguf())
    path = Path(model).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ExternalEngineMissing(f"--compare llama.cpp needs a .gguf model (llama.cpp reads GGUF only), "
                                    f"got {model!r}")
    return path


def start_llamacpp_runner(args, prompt: list[int], output_len: int, threads: int) -> ExternalRunner:
    return _start(args, {"mode": "latency", "prompt": prompt, "output_len": output_len, "n_threads": threads,
                         "n_ctx": max(2048, len(prompt) + output_len + 8), "seed": args.seed})


def start_llamacpp_perplexity(args, windows: list[list[int]], threads: int) -> ExternalRunner:
    return _start(args, {"mode": "perplexity", "windows": windows, "n_threads": threads,
                         "n_ctx": max(2048, max(map(len, windows)) + 8)})


def _start(args, workload: dict) -> ExternalRunner:
    """The runner in llama-cpp-python's venv on `workload` (the model: gguf_for(args.model))."""
    python = find_llamacpp_python(getattr(args, "llamacpp_python", None))
    workload = {"model": str(gguf_for(args.model)), **workload}
    log_path = os.path.join(tempfile.gettempdir(), f"tessera-llamacpp-{os.getpid()}.log")
    print(f"starting llama.cpp ({python}; log {log_path})", file=sys.stderr, flush=True)
    return ExternalRunner(python, workload, script=RUNNER, log_path=log_path)
