"""Per-step cost models for the fleet simulator: how long one engine step of a given shape takes, and how
long moving KV between instances takes.

A step's shape (`StepShape`) is what the scheduler planned: prefill tokens (and their attention work,
query-key pairs), decode sequences (and the KV they read). Two models price it:

- `LinearCost`: t = base + a*prefill_tokens + b*prefill_pairs + c*decode_seqs + d*decode_context, with
  non-negative coefficients fitted (scipy's NNLS) from real tessera steps timed on this machine
  (`tessera sim fit`, tessera/fleet/fit.py).
- `RooflineCost`: the larger of compute time (FLOPs at a fraction of the chips' peak) and memory time
  (weights + KV read at a fraction of HBM bandwidth), plus a fixed per-step overhead; the H100 preset
  uses NVIDIA's published H100 SXM figures (989 TFLOP/s dense BF16, 3.35 TB/s HBM3) and Llama-2-70B's
  shape (Touvron et al. 2023: 80 layers, hidden 8192, 64 heads, 8 KV heads, FFN 28672).

KV moves over a link: latency + bytes / bandwidth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from tessera.errors import InvalidRequestError


@dataclass(frozen=True)
class StepShape:
    prefill_tokens: int = 0
    prefill_pairs: int = 0  # query-key pairs of the prefill chunks' attention
    decode_seqs: int = 0
    decode_context: int = 0  # KV positions the decode sequences read

    @classmethod
    def of(cls, chunks: list[tuple[int, int, bool]]) -> StepShape:
        """From (tokens already computed, new tokens, is a decode) for each scheduled sequence."""
        pt = pp = ds = dc = 0
        for start, n, decode in chunks:
            if decode:
                ds += 1
                dc += start + n
            else:
                pt += n
                pp += n * start + n * (n + 1) // 2
        return cls(pt, pp, ds, dc)

    @classmethod
    def of_plan(cls, scheduled) -> StepShape:
        """From a scheduler plan (tessera.engine.scheduler.ScheduledSeq list), before the step runs."""
        return cls.of([(it.seq.num_computed_tokens, it.num_new_tokens,
                        it.seq.num_computed_tokens >= it.seq.num_prompt_tokens) for it in scheduled])

    def features(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.prefill_pairs, self.decode_seqs, self.decode_context]


@dataclass
class CostModel:
    kv_bytes_per_token: int = 0
    num_layers: int = 1
    link_bandwidth: float = 10e9  # bytes/s between instances
    link_latency: float = 50e-6  # seconds per transfer
    description: str = ""
    # Quantiles (0, 2.5, ..., 100%) of measured / fitted step time over the steps fitted: the spread a
    # deterministic formula loses (on a shared 2-core CPU a step took 0.4-5x its fitted time), which
    # the simulator draws each step's factor from, so queueing tails see the slow steps the real runs had.
    step_noise: list[float] = field(default_factory=list)
    # Instances sharing one host's cores (a CPU fleet; tessera.fleet.contention fits these from real runs),
    # each keyed by "policy/N" (N instances), "policy" or "*" (any), the most specific found first:
    # contention[key][k] is how many times slower a step runs while k other instances step (the last entry
    # for more), step_overhead[key] the seconds a step costs in a fleet beyond its time alone (streaming its
    # outputs), step_gap[key] the seconds each engine loop spends outside its step (ops, K/V replication),
    # and noise_by_key[key] the step_noise of those runs, for decode-only steps ("decode") and steps with
    # prompt tokens ("prefill") apart (a short decode step is thrown about far more by a pause of the
    # router, Ray or the OS than a long prefill). Empty: each instance has a device of its own.
    contention: dict[str, list[float]] = field(default_factory=dict)
    step_overhead: dict[str, float] = field(default_factory=dict)
    step_gap: dict[str, float] = field(default_factory=dict)
    noise_by_key: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # The host's speed while the fitted runs ran, per key: the median measured / fitted time of their decode
    # steps that no other instance overlapped (tessera.fleet.contention.machine_speed), and the factor
    # every step's time alone is multiplied by in a simulation (1: as fitted). A VM's vCPUs run at
    # different speeds from one run to the next, minutes apart (docs/benchmarks.md); `tessera sim
    # --compare --match-speed` sets `speed` to a real run's own over the fitted runs', so that a
    # prediction can be told apart from the machine's drift.
    machine_speed: dict[str, float] = field(default_factory=dict)
    speed: float = 1.0

    kind = "base"

    def step_time(self, shape: StepShape) -> float:
        raise NotImplementedError

    def noise_factor(self, u: float, policy: str | None = None, num_instances: int | None = None,
                     prefill: bool = False) -> float:
        """What a step's time is multiplied by, for a uniform draw u in [0, 1): 1 (no noise) unless the
        model carries the spread of the steps it was fitted from (that fleet's and that kind of step's,
        where fitted per fleet)."""
        by_kind = self._host(self.noise_by_key, policy, num_instances) or {}
        q = by_kind.get("prefill" if prefill else "decode") or self.step_noise
        if not q:
            return 1.0
        return float(np.interp(u, np.linspace(0.0, 1.0, len(q)), q))

    @staticmethod
    def _host(table: dict, policy: str | None, num_instances: int | None, default=None):
        for key in (f"{policy}/{num_instances}", policy, "*"):
            if key in table:
                return table[key]
        return default

    def slowdown_table(self, policy: str, num_instances: int | None = None) -> list[float]:
        return self._host(self.contention, policy, num_instances, [])

    def gap_for(self, policy: str, num_instances: int | None = None) -> float:
        return self._host(self.step_gap, policy, num_instances, 0.0)

    def overhead_for(self, policy: str, num_instances: int | None = None) -> float:
        return self._host(self.step_overhead, policy, num_instances, 0.0)

    def speed_for(self, policy: str, num_instances: int | None = None) -> float | None:
        return self._host(self.machine_speed, policy, num_instances)

    def kv_transfer_time(self, tokens: int) -> float:
        return self.link_latency + tokens * self.kv_bytes_per_token / self.link_bandwidth

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


@dataclass
class LinearCost(CostModel):
    base: float = 0.0
    per_prefill_token: float = 0.0
    per_prefill_pair: float = 0.0
    per_decode_seq: float = 0.0
    per_decode_context: float = 0.0
    fit_stats: dict = field(default_factory=dict)

    kind = "linear"

    def coefficients(self) -> np.ndarray:
        return np.array([self.base, self.per_prefill_token, self.per_prefill_pair, self.per_decode_seq,
                         self.per_decode_context])

    def step_time(self, shape: StepShape) -> float:
        return float(np.dot(self.coefficients(), shape.features()))

    @classmethod
    def fit(cls, samples: list[tuple[StepShape, float]], **kw) -> LinearCost:
        """Non-negative least squares on relative error (each row divided by its time), so short decode
        steps weigh as much as long prefills."""
        from scipy.optimize import nnls

        if len(samples) < 5:
            raise InvalidRequestError(f"fitting a step cost needs at least 5 timed steps, got {len(samples)}")
        x = np.array([s.features() for s, _ in samples], dtype=np.float64)
        y = np.array([t for _, t in samples], dtype=np.float64)
        scale = x.max(axis=0)
        scale[scale == 0] = 1.0
        w = 1.0 / y
        coef, _ = nnls(x / scale * w[:, None], y * w)
        coef = coef / scale
        pred = x @ coef
        rel = np.abs(pred / y - 1.0)
        stats = {"num_steps": len(samples), "median_rel_error": float(np.median(rel)),
                 "p90_rel_error": float(np.percentile(rel, 90)),
                 "r2": float(1 - ((pred - y) ** 2).sum() / (((y - y.mean()) ** 2).sum() or 1.0))}
        noise = [float(v) for v in np.quantile(y / np.maximum(pred, 1e-9), np.linspace(0.0, 1.0, 41))]
        return cls(base=coef[0], per_prefill_token=coef[1], per_prefill_pair=coef[2], per_decode_seq=coef[3],
                   per_decode_context=coef[4], fit_stats=stats, step_noise=noise, **kw)


@dataclass
class RooflineCost(CostModel):
    params: float = 0.0  # weights (count)
    weight_bytes: float = 0.0
    hidden: int = 0
    tp: int = 1  # chips per instance (tensor parallel)
    peak_flops: float = 0.0  # per chip
    hbm_bandwidth: float = 0.0  # bytes/s per chip
    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.7
    overhead: float = 0.0  # seconds per step (launches, tensor-parallel all-reduces)

    kind = "roofline"

    def step_time(self, shape: StepShape) -> float:
        tokens = shape.prefill_tokens + shape.decode_seqs
        if tokens == 0:
            return 0.0
        attn_pairs = shape.prefill_pairs + shape.decode_context
        flops = 2 * self.params * tokens + 4 * self.num_layers * self.hidden * attn_pairs
        kv_read = (shape.decode_context + shape.prefill_tokens) * self.kv_bytes_per_token
        compute = flops / (self.tp * self.peak_flops * self.compute_efficiency)
        memory = (self.weight_bytes + kv_read) / (self.tp * self.hbm_bandwidth * self.memory_efficiency)
        return max(compute, memory) + self.overhead


def llama2_70b_h100(tp: int = 8, link_bandwidth: float = 400e9) -> RooflineCost:
    """Llama-2-70B in BF16 on `tp` H100 SXM chips per instance (default: one 8-GPU node, as Splitwise ran
    it), instances linked at `link_bandwidth` bytes/s (default 8 x 400 Gb/s InfiniBand per node)."""
    layers, hidden, kv_heads, head_dim = 80, 8192, 8, 128
    params = 68.98e9
    return RooflineCost(
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * 2, num_layers=layers, link_bandwidth=link_bandwidth,
        link_latency=20e-6, params=params, weight_bytes=2 * params, hidden=hidden, tp=tp, peak_flops=989e12,
        hbm_bandwidth=3.35e12, compute_efficiency=0.5, memory_efficiency=0.7,
        overhead=2 * layers * 12e-6 + 1e-3,  # two all-reduces a layer (~12 us each on NVLink) + launches
        description=f"Llama-2-70B BF16, TP={tp} H100 SXM (roofline: 989 TFLOP/s x 0.5, 3.35 TB/s x 0.7)")


def load_cost_model(path: str | Path) -> CostModel:
    data = json.loads(Path(path).read_text())
    kind = data.pop("kind", None)
    cls = {"linear": LinearCost, "roofline": RooflineCost}.get(kind)
    if cls is None:
        raise InvalidRequestError(f"{path}: unknown cost model kind {kind!r}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


PRESETS = {"h100-llama2-70b": llama2_70b_h100}
