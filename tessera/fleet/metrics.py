"""The result record of a fleet run, shared by the real fleet bench and the simulator so that both print
the same JSON and can be compared figure by figure.

Per request: arrival, first-token and finish times and the time of every output token, from which
TTFT (first token - arrival), TBT (gaps between consecutive tokens) and e2e (finish - arrival) follow.
Per instance: busy time over the run's span (idle fraction = 1 - busy / span) and the peak of KV in use.
Times are seconds from any fixed origin (the run's start); the summary is in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    request_id: str
    arrival: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # when each output token came out
    finish: float | None = None
    instances: list[int] = field(default_factory=list)  # where it ran, in order (prefill first)
    completions: int = 0  # how many times it finished (exactly once is the invariant)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tbt(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival


@dataclass
class InstanceRecord:
    instance_id: int
    role: str = "mixed"
    busy_time: float = 0.0  # seconds spent in steps
    span: float = 0.0  # seconds the run lasted, as seen by this instance
    steps: int = 0
    peak_kv_blocks: int = 0
    kv_bytes_per_block: int = 0
    # real runs: every step's shape and time, [prefill tokens, prefill pairs, decode seqs, decode context,
    # seconds, start (time.time()), seconds outside the step] (cost_model.StepShape's fields first), what
    # `tessera sim fit --from-runs` fits a cost from
    step_samples: list[list[float]] = field(default_factory=list)

    @property
    def idle_fraction(self) -> float:
        return max(0.0, 1.0 - self.busy_time / self.span) if self.span > 0 else 1.0

    @property
    def peak_kv_bytes(self) -> int:
        return self.peak_kv_blocks * self.kv_bytes_per_block


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.asarray(values, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


@dataclass
class FleetResult:
    policy: str
    num_instances: int
    source: str  # "real" (the Ray fleet) or "sim"
    requests: list[RequestRecord] = field(default_factory=list)
    instances: list[InstanceRecord] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # what produced it: trace, rate, model, cost model...

    def summary(self) -> dict:
        done = [r for r in self.requests if r.finish is not None]
        span = (max(r.finish for r in done) - min(r.arrival for r in self.requests)) if done else 0.0
        return {
            "policy": self.policy,
            "num_instances": self.num_instances,
            "source": self.source,
            "num_requests": len(self.requests),
            "completed": len(done),
            "completed_more_than_once": sum(r.completions > 1 for r in self.requests),
            "duration_s": span,
            "output_tokens": sum(r.output_tokens for r in self.requests),
            "ttft": _pcts([r.ttft for r in done if r.ttft is not None]),
            "tbt": _pcts([g for r in done for g in r.tbt]),
            "e2e": _pcts([r.e2e for r in done]),
            "instances": [{"instance_id": i.instance_id, "role": i.role, "idle_fraction": i.idle_fraction,
                           "steps": i.steps, "peak_kv_blocks": i.peak_kv_blocks, "peak_kv_bytes": i.peak_kv_bytes}
                          for i in self.instances],
            "idle_fraction_mean": (float(np.mean([i.idle_fraction for i in self.instances]))
                                   if self.instances else None),
            "peak_kv_bytes_max": max((i.peak_kv_bytes for i in self.instances), default=0),
        }

    def to_json(self, per_request: bool = True) -> dict:
        out = {"summary": self.summary(), "config": self.config}
        if per_request:
            out["requests"] = [asdict(r) for r in self.requests]
            out["instance_records"] = [asdict(i) for i in self.instances]
        return out

    def dumps(self, per_request: bool = True) -> str:
        return json.dumps(self.to_json(per_request), indent=2)

    @classmethod
    def from_json(cls, data: dict) -> FleetResult:
        s = data["summary"]
        return cls(policy=s["policy"], num_instances=s["num_instances"], source=s["source"],
                   requests=[RequestRecord(**r) for r in data.get("requests", [])],
                   instances=[InstanceRecord(**i) for i in data.get("instance_records", [])],
                   config=data.get("config", {}))


FIGURES = [(m, q) for m in ("ttft", "tbt", "e2e") for q in ("p50_ms", "p99_ms")]


def compare(predicted: dict, measured: dict) -> dict:
    """Relative error (predicted / measured - 1) of each p50/p99 figure of two summaries."""
    out = {}
    for metric, q in FIGURES:
        p, m = predicted[metric][q], measured[metric][q]
        out[f"{metric}_{q}"] = None if p is None or not m else p / m - 1.0
    return out


def median_figures(summaries: list[dict]) -> dict:
    """Each p50/p99 figure's median over several summaries (simulated runs of other seeds, or real runs of
    one command)."""
    out: dict = {}
    for m, q in FIGURES:
        vals = [s[m][q] for s in summaries if s[m][q] is not None]
        out.setdefault(m, {})[q] = float(np.median(vals)) if vals else None
    return out


def comparison_table(rows: list[tuple[str, dict, dict]], tolerance: float = 0.15) -> str:
    """A text table of predicted / measured figures, (label, predicted, measured) a row, and how many of
    them are within `tolerance`."""
    head = "".join(f"{m.upper()} {q[:3]:>4}".rjust(22) for m, q in FIGURES)
    width = max([16] + [len(label) for label, _, _ in rows])
    lines, errors = [f"{'':>{width}}{head}   (ms: predicted / measured, error)"], []
    for label, pred, real in rows:
        cells, errs = [], compare(pred, real)
        for m, q in FIGURES:
            err = errs[f"{m}_{q}"]
            if err is None:
                cells.append("-".rjust(22))
                continue
            errors.append(abs(err))
            cells.append(f"{pred[m][q]:.0f} / {real[m][q]:.0f} ({err * 100:+.0f}%)".rjust(22))
        lines.append(f"{label:>{width}}" + "".join(cells))
    if errors:
        lines.append(f"within {tolerance * 100:.0f}%: {sum(e <= tolerance for e in errors)} of {len(errors)} figures; "
                     f"median |error| {np.median(errors) * 100:.0f}%")
    return "\n".join(lines)
