"""The Azure LLM inference trace 2023 (CC-BY 4.0; see tessera/fleet/data/README.md): loading, rate
scaling and token-length clipping, and the token ids a replay sends.

The trace gives each request's arrival time and its prompt (ContextTokens) and output
(GeneratedTokens) lengths, no text. A replay on small models on a CPU needs it reshaped: lengths are
clipped (`max_prompt_tokens`, `max_output_tokens`) and arrival gaps scaled (`request_rate` keeps the
trace's burstiness and sets its mean rate; `time_scale` multiplies every gap). Prompts are token ids drawn
from a generator seeded by the request's index, so the real fleet and the simulator replay identical
prompts; with `shared_prefix_tokens`, a fraction of them starts with one of a few shared system prompts,
which gives prefix-aware routing something to find (the trace itself says nothing about sharing).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tessera.config_args import arg
from tessera.errors import InvalidRequestError

DATA_DIR = Path(__file__).parent / "data"
SLICES = {"conv": DATA_DIR / "azure_conv_2023_slice.csv", "code": DATA_DIR / "azure_code_2023_slice.csv"}


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival: float  # seconds after the first request
    prompt_tokens: int
    output_tokens: int

    @property
    def request_id(self) -> str:
        return f"trace-{self.index}"


@dataclass(frozen=True)
class TraceSpec:
    """How a trace is replayed; the fleet bench and the simulator take the same one."""

    name: str = arg("conv", "trace: a shipped Azure 2023 slice (conv, code) or a CSV in its format",
                    flags=("--trace",))
    num_requests: int | None = arg(None, "replay the first N requests (default: all)")
    skip_requests: int = arg(0, "start after the trace's first N requests (a slice apart from another's: "
                                "fit on one, predict the other)")
    request_rate: float | None = arg(None, "scale arrival gaps to this mean rate, requests/s (default: the trace's)")
    time_scale: float = arg(1.0, "multiply every arrival gap by this (when --request-rate is not given)")
    max_prompt_tokens: int | None = arg(None, "clip prompts to this many tokens")
    max_output_tokens: int | None = arg(None, "clip outputs to this many tokens")
    min_output_tokens: int = arg(1, "raise outputs to at least this many tokens")
    shared_prefix_tokens: int = arg(0, "length of the synthetic shared system prompts (0: none)")
    shared_prefix_fraction: float = arg(0.0, "fraction of requests that start with a shared system prompt")
    num_shared_prefixes: int = arg(4, "how many distinct shared system prompts")
    vocab_size: int = arg(49152, "prompt token ids are drawn from [10, vocab size)")
    seed: int = arg(0, "seed of the replayed prompts", flags=("--trace-seed",))

def _read_csv(path: Path) -> list[tuple[float, int, int]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            # Timestamps carry 7 fractional digits; datetime takes at most 6.
            stamp = row["TIMESTAMP"].strip()
            head, _, frac = stamp.partition(".")
            t = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}" if frac else head).timestamp()
            rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        raise InvalidRequestError(f"trace {path} has no requests")
    return rows


def load_trace(spec: TraceSpec) -> list[TraceRequest]:
    path = SLICES.get(spec.name) or Path(spec.name)
    if not path.is_file():
        raise InvalidRequestError(f"trace {spec.name!r}: not a shipped slice ({', '.join(SLICES)}) nor a CSV file")
    rows = sorted(_read_csv(path), key=lambda r: r[0])
    if spec.skip_requests < 0:
        raise InvalidRequestError("skip_requests must be >= 0")
    if spec.skip_requests >= len(rows):
        raise InvalidRequestError(f"trace {spec.name!r} has {len(rows)} requests; cannot skip {spec.skip_requests}")
    rows = rows[spec.skip_requests:]
    if spec.num_requests is not None:
        if spec.num_requests < 1:
            raise InvalidRequestError("num_requests must be >= 1")
        rows = rows[: spec.num_requests]
    t0 = rows[0][0]
    times = [t - t0 for t, _, _ in rows]
    scale = spec.time_scale
    if spec.request_rate is not None:
        if spec.request_rate <= 0:
            raise InvalidRequestError("request_rate must be > 0")
        span = times[-1]
        own_rate = (len(times) - 1) / span if span > 0 else float("inf")
        scale = own_rate / spec.request_rate if span > 0 else 0.0
    if scale < 0:
        raise InvalidRequestError("time_scale must be >= 0")
    out = []
    for i, (t, ctx, gen) in enumerate(zip(times, (r[1] for r in rows), (r[2] for r in rows), strict=True)):
        p = max(1, ctx if spec.max_prompt_tokens is None else min(ctx, spec.max_prompt_tokens))
        o = max(spec.min_output_tokens, gen if spec.max_output_tokens is None else min(gen, spec.max_output_tokens))
        out.append(TraceRequest(spec.skip_requests + i, t * scale, p, o))  # the trace's own index: its own prompt
    return out


def prompt_token_ids(req: TraceRequest, spec: TraceSpec) -> list[int]:
    """The prompt a replay sends for `req`: deterministic in (spec.seed, req.index)."""
    rng = random.Random(spec.seed * 1_000_003 + req.index)
    ids: list[int] = []
    if spec.shared_prefix_tokens and rng.random() < spec.shared_prefix_fraction:
        which = rng.randrange(spec.num_shared_prefixes)
        prefix_rng = random.Random(spec.seed * 7919 + 1_000_000_007 + which)
        ids = [prefix_rng.randrange(10, spec.vocab_size) for _ in range(spec.shared_prefix_tokens)]
    ids = ids[: req.prompt_tokens - 1] if req.prompt_tokens > 1 else []
    ids += [rng.randrange(10, spec.vocab_size) for _ in range(req.prompt_tokens - len(ids))]
    return ids
