"""How instances that share one host's cores slow each other down, fitted from real fleet runs.

On a CPU fleet (`tessera serve --instances N` on one machine) a step's time depends on more than its
shape: while another instance steps, the two share the cores, the memory bandwidth and, on a VM, the
hyperthreads behind its vCPUs; the router and Ray's threads take their share too, and AcceLLM pairs add
the K/V rows they copy to each other. The simulator models the host as processor sharing: a step whose
time alone is t (the grid-fitted cost of `tessera sim fit`) runs at rate 1/s_k while k other instances
step. s_k is fitted here from every step a real fleet timed, each with its start on the host's clock
(tessera/fleet/instance.py): measured / solo = sum_k share_k * s_k, share_k being the part of the step's
wall time during which exactly k others were stepping; non-negative least squares, per routing policy
and fleet size (what a policy does between steps differs, and so does the Ray traffic of N instances)
and pooled ("*"), with a fixed extra b per step in a fleet
(measured = sum_k share_k * s_k * (solo + b)). What the formula leaves (measured / modelled), for
decode-only steps and steps with prompt tokens apart, is the spread each simulated step of that kind
draws its factor from; the loop's time outside its steps is the gap.

The arithmetic form ("time", the default) is not what the simulator's processor sharing does with a
table: there a step's work solo is done at rate 1/s_k through share_k of its wall time, solo = measured *
sum_k share_k / s_k (tests/fleet/test_contention.py). Fitted in that form ("rate", `tessera sim fit
--contention-form rate`), the rates 1/s_k by the same least squares, the
per-step error on the calibration runs is lower (median |log ratio| 0.13-0.19 against 0.19-0.24 at four
instances on the Zen 5 host), but the simulated fleets step far too slowly: at four instances the
tables grow to s_3 = 2.9-3.5, the simulation's slower steps overlap more, and the figures predicted
within 15% fell from 40 to 33 of 60 (51 to 38 in-sample). The arithmetic table is the smaller one at
the busy levels, and it is what reproduces the calibration runs, so it is kept, as an empirical
rule rather than a consistent one.

The host's own speed drifts too: on the 2-vCPU VM a colocated run's decode steps taken with no other
instance stepping ran 0.92-1.28x their fitted time from one run to the next, minutes apart
(docs/benchmarks.md). `machine_speed` measures it per run; the fit keeps its calibration runs' speeds, and
`tessera sim --compare --match-speed` runs each prediction at the compared run's speed over those, which
tells the simulator's error apart from the machine's drift (it reads one figure of the measured run, so
it is reported beside the plain prediction, never instead of it).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from tessera.errors import InvalidRequestError
from tessera.fleet.cost_model import CostModel, StepShape

MIN_STEPS_PER_LEVEL = 5.0  # a level (k others stepping) seen for less than this many steps' worth is not fitted


def overlap_shares(instances: list[np.ndarray]) -> list[np.ndarray]:
    """For each instance's step rows ([..., seconds, start, ...] as step_samples), the share of each step's
    wall time during which exactly k = 0..N-1 other instances were stepping: one [steps, N] array each."""
    n = len(instances)
    spans = [(r[:, 5], r[:, 5] + r[:, 4]) if len(r) else (np.zeros(0), np.zeros(0)) for r in instances]
    order = [np.argsort(s) for s, _ in spans]
    starts = [s[o] for (s, _), o in zip(spans, order, strict=True)]
    ends = [e[o] for (_, e), o in zip(spans, order, strict=True)]
    out = []
    for j, rows in enumerate(instances):
        shares = np.zeros((len(rows), n))
        others = [i for i in range(n) if i != j]
        for row, (s, e) in enumerate(zip(*spans[j], strict=True)):
            cuts = [s, e]
            for i in others:  # an instance's own steps never overlap, so its busy count is 0 or 1
                lo, hi = np.searchsorted(ends[i], s), np.searchsorted(starts[i], e)
                cuts += [t for t in (*starts[i][lo:hi], *ends[i][lo:hi]) if s < t < e]
            cuts = np.unique(cuts)
            mids, widths = (cuts[:-1] + cuts[1:]) / 2, np.diff(cuts)
            # (clipped: two clocks time a step, time.time() its start and perf_counter its length, so an
            # instance's consecutive steps can seem to overlap by microseconds)
            busy = sum(np.clip(np.searchsorted(starts[i], mids, "right") - np.searchsorted(ends[i], mids, "right"),
                               0, 1) for i in others) if others else np.zeros(len(mids), dtype=int)
            np.add.at(shares[row], np.asarray(busy, dtype=int), widths / max(e - s, 1e-12))
        out.append(shares)
    return out


FORMS = ("time", "rate")
MIN_SPEED_STEPS = 20  # unoverlapped decode steps a run's machine speed is measured on, at least


def machine_speed(instances: list[np.ndarray], solo: CostModel) -> float | None:
    """How many times slower than `solo` the host ran during a run: the median measured / fitted time of
    its decode-only steps that no other instance overlapped (at least 95% of the step alone), so neither
    contention nor prefill shapes enter it (None: too few such steps)."""
    rows = [r for r in instances if len(r)]
    if not rows:
        return None
    r = np.vstack(rows)
    fitted = np.array([solo.step_time(StepShape(*map(int, x[:4]))) for x in r])
    return _speed(r, np.vstack([s for s in overlap_shares(instances) if len(s)]), fitted)


def _speed(rows: np.ndarray, shares: np.ndarray, fitted: np.ndarray) -> float | None:
    """machine_speed of one run's stacked steps, their overlap shares and fitted times."""
    alone = (rows[:, 0] == 0) & (shares[:, 0] > 0.95)
    if alone.sum() < MIN_SPEED_STEPS:
        return None
    return float(np.median(rows[alone, 4] / fitted[alone]))


def _fit_levels(shares: np.ndarray, solo: np.ndarray, measured: np.ndarray,
                form: str = "time") -> tuple[list[float], float]:
    """(s_k, b), b a fixed extra a step costs in a fleet (the outputs it streams, the events its poll
    thread wakes for), by non-negative least squares on relative error for each b of a grid, the best b
    kept. form "time": measured = sum_k share_k * s_k * (solo + b), in the s_k; "rate": solo + b =
    measured * sum_k share_k / s_k, in the rates 1/s_k (processor sharing's own form). Levels seen too
    little take the level below's value."""
    from scipy.optimize import nnls

    if form not in FORMS:
        raise InvalidRequestError(f"contention form must be one of {', '.join(FORMS)}, got {form!r}")
    seen = shares.sum(axis=0)
    keep = np.flatnonzero(seen >= MIN_STEPS_PER_LEVEL)
    if not len(keep) or keep[0] != 0:
        keep = np.union1d([0], keep)
    best = None
    for b in np.arange(0.0, 0.0201, 0.00025):
        if form == "time":
            coef, err = nnls(shares[:, keep] * ((solo + b) / np.maximum(measured, 1e-9))[:, None],
                             np.ones(len(measured)))
        else:
            coef, err = nnls(shares[:, keep] * (measured / (solo + b))[:, None], np.ones(len(measured)))
        if best is None or err < best[0] - 1e-12:
            best = (err, coef, float(b))
    _, coef, b = best
    if form == "rate":
        coef = 1.0 / np.maximum(coef, 1e-3)
    table = []
    for k in range(int(keep.max()) + 1):
        table.append(float(coef[list(keep).index(k)]) if k in keep else table[-1])
    # more instances stepping never makes a step faster: what says otherwise is noise in the fit
    return [float(v) for v in np.maximum.accumulate(np.maximum(table, 1e-3))], b


def modelled_time(shares: np.ndarray, table: list[float], solo: np.ndarray, b: float, form: str) -> np.ndarray:
    """Each step's wall time as `form` models it (levels past the table at its last entry)."""
    full = np.asarray([*table, *[table[-1]] * max(shares.shape[1] - len(table), 0)])[: shares.shape[1]]
    if form == "time":
        return shares @ full * (solo + b)
    return (solo + b) / (shares @ (1.0 / full))


def step_rows(run: dict, name: str) -> list[np.ndarray]:
    """Each instance's step samples of a FleetResult record, one [steps, 7] array each."""
    rows = [np.asarray(i.get("step_samples") or np.zeros((0, 7)), dtype=np.float64).reshape(-1, 7)
            if all(len(r) >= 7 for r in i.get("step_samples", [])) else None
            for i in run.get("instance_records", [])]
    if any(r is None for r in rows):
        raise InvalidRequestError(f"{name}: its step samples carry no start times (recorded before they did); "
                                  "run `tessera bench fleet` again")
    return rows


def _read(paths: list[str]) -> list[tuple[str, list[np.ndarray]]]:
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = step_rows(data, path)
        runs.append((f"{data['summary']['policy']}/{data['summary']['num_instances']}", rows))
    if not any(len(r) for _, rows in runs for r in rows):
        raise InvalidRequestError(f"no step samples in {paths} (FleetResult files of `tessera bench fleet --out-dir`)")
    return runs


def fit_contention(paths: list[str], solo: CostModel, form: str = "time") -> CostModel:
    """`solo` (each step's time alone on the host) with the contention, overhead, gaps and step noise of
    the runs in `paths` (`tessera bench fleet --out-dir` files), per policy and fleet size ("policy/N")
    and pooled ("*")."""
    by_key: dict[str, list[tuple[np.ndarray, ...]]] = {}
    speeds: dict[str, list[float]] = {}  # per key, each run's machine speed (several runs: their median)
    for key, rows in _read(paths):
        parts = []
        for r, sh in zip(rows, overlap_shares(rows), strict=True):
            if len(r):
                pred = np.array([solo.step_time(StepShape(*map(int, x[:4]))) for x in r])
                parts.append((r, sh, pred))
                by_key.setdefault(key, []).append((sh, pred, r[:, 4], r[:, 6], r[:, 0] > 0))
        speed = _speed(*(np.concatenate(x) for x in zip(*parts, strict=True))) if parts else None
        if speed is not None:
            speeds.setdefault(key, []).append(speed)
    width = max(parts[0].shape[1] for runs in by_key.values() for parts in runs)

    def stack(runs):
        sh = np.vstack([np.pad(p[0], ((0, 0), (0, width - p[0].shape[1]))) for p in runs])
        return (sh, *(np.concatenate([p[i] for p in runs]) for i in (1, 2, 3, 4)))

    def quantiles(x):
        return [float(v) for v in np.quantile(x, np.linspace(0.0, 1.0, 41))]

    contention, overhead, gaps, noise, residual, stats = {}, {}, {}, {}, [], {}
    for key, runs in sorted(by_key.items()):
        sh, pred, measured, gap, prefill = stack(runs)
        table, b = _fit_levels(sh, pred, measured, form)
        residual.append(measured / modelled_time(sh, table, pred, b, form))
        contention[key], overhead[key], gaps[key] = table, b, float(gap.mean())
        noise[key] = {kind: quantiles(residual[-1][m]) for kind, m in (("decode", ~prefill), ("prefill", prefill))
                      if m.any()}
        stats[key] = {"steps": len(measured), "median_rel_error": float(np.median(np.abs(residual[-1] - 1)))}
    sh, pred, measured, gap, _ = stack([p for runs in by_key.values() for p in runs])
    (contention["*"], overhead["*"]), gaps["*"] = _fit_levels(sh, pred, measured, form), float(gap.mean())
    extra = {"fit_stats": {**solo.fit_stats, "contention": stats}} if hasattr(solo, "fit_stats") else {}
    return replace(solo, contention=contention, step_overhead=overhead, step_gap=gaps, noise_by_key=noise,
                   step_noise=quantiles(np.concatenate(residual)),
                   machine_speed={k: float(np.median(v)) for k, v in speeds.items()},
                   description=f"{solo.description}; contention ({form} form) fitted from {len(paths)} fleet run(s)",
                   **extra)
