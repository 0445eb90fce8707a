"""Default sampling values from a model's `generation_config.json`, as vLLM's `--generation-config auto`.

Model authors put their recommended temperature, top_p, ... there. vLLM applies them to every request
that leaves them unset (the server, and `LLM.generate` without sampling params, through
`LLM.get_default_sampling_params()`); a `SamplingParams` the user builds stays as built. A checkpoint
without the file (a GGUF converted by tessera carries only token ids there) changes nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tessera.errors import InvalidRequestError

log = logging.getLogger("tessera")

# generation_config.json key -> SamplingParams field (vLLM's list)
GENERATION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_generation_defaults(model_dir: Path, mode: str = "auto") -> dict:
    """SamplingParams keyword arguments from `model_dir`/generation_config.json (mode "auto"), or {}
    (mode "vllm": tessera's own defaults, or no file, or a file that cannot be used, which is logged)."""
    path = Path(model_dir) / "generation_config.json"
    if mode != "auto" or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    defaults = {dst: raw[src] for src, dst in GENERATION_FIELDS.items() if raw.get(src) is not None}
    if not defaults:
        return {}
    from tessera.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except (InvalidRequestError, TypeError) as e:
        log.warning("ignoring the sampling defaults of %s: %s", path, e)
        return {}
    log.info("default sampling values from the model's generation_config.json (requests that leave them unset "
             "get these; --generation-config vllm turns this off): %s", defaults)
    return defaults
