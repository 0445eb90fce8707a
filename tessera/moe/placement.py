"""ExFlow expert placement: put each layer's experts on ranks so that a token's experts in consecutive
layers tend to share a rank, under a per-rank expert capacity.

Tokens stay on the rank of their primary (highest-weight) expert between layers (tessera.moe.traffic).
A token then crosses ranks at layer l+1 for each of its experts placed off the rank of its layer-l
primary, and a secondary expert's partial output crosses back when it sits off the new primary's rank.
Both are cuts of weighted expert pairs, so the expected moves are a weighted graph cut over the nodes
(layer, expert): `PairWeights` holds the inter-layer weights (primary at l -> any expert at l+1) and the
intra-layer ones (primary -> secondary at l), estimated from a routing trace.

Solvers: `solve_ilp` (exact, scipy's HiGHS `milp`, with a time limit; best incumbent kept), `solve_greedy`
(steepest pairwise swaps from round-robin, Kernighan-Lin style, for sizes the ILP cannot take), and the
`round_robin` baseline. `solve` runs the ILP where it is small enough and never returns worse than greedy."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tessera.errors import InvalidRequestError, ModelLoadError
from tessera.moe.trace import RoutingTrace

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """rank_of[l, e]: the rank that holds expert e of MoE layer l."""

    rank_of: np.ndarray  # [L, E] int
    num_ranks: int
    method: str = ""
    info: dict = field(default_factory=dict)
    capacity: int | None = None  # experts per rank and layer it was solved for (None: ceil(E / R))

    def __post_init__(self):
        self.rank_of = np.asarray(self.rank_of, dtype=np.int64)
        if self.rank_of.ndim != 2:
            raise InvalidRequestError(f"a placement is [layers, experts]; got shape {self.rank_of.shape}")
        if self.rank_of.size and (self.rank_of.min() < 0 or self.rank_of.max() >= self.num_ranks):
            raise InvalidRequestError(f"placement ranks must lie in [0, {self.num_ranks})")

    @property
    def num_layers(self) -> int:
        return self.rank_of.shape[0]

    @property
    def num_experts(self) -> int:
        return self.rank_of.shape[1]

    def experts_on(self, layer: int, rank: int) -> list[int]:
        return [int(e) for e in np.flatnonzero(self.rank_of[layer] == rank)]

    def max_load(self) -> int:
        return int(max(np.bincount(row, minlength=self.num_ranks).max() for row in self.rank_of))

    def to_json(self) -> dict:
        return {"num_ranks": self.num_ranks, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "capacity": self.capacity, "method": self.method, "rank_of": self.rank_of.tolist(),
                "info": self.info}

    def check_fits(self, num_layers: int, num_experts: int, num_ranks: int, what: str = "the model") -> None:
        """This placement can serve `num_layers` MoE layers of `num_experts` experts on `num_ranks` ranks
        with at most `capacity` experts per rank and layer, or a clear InvalidRequestError."""
        if self.num_ranks != num_ranks:
            raise InvalidRequestError(f"the expert placement is for {self.num_ranks} ranks; the engine runs "
                                      f"{num_ranks} (expert_parallel_size)")
        if self.rank_of.shape != (num_layers, num_experts):
            raise InvalidRequestError(f"the expert placement covers {self.num_layers} MoE layers x "
                                      f"{self.num_experts} experts; {what} has {num_layers} x {num_experts}")
        cap = self.capacity or default_capacity(num_experts, num_ranks)
        loads = np.stack([np.bincount(row, minlength=num_ranks) for row in self.rank_of])
        over = np.argwhere(loads > cap)
        if len(over):
            layer, rank = (int(v) for v in over[0])
            raise InvalidRequestError(f"the expert placement puts {int(loads[layer, rank])} experts of MoE layer "
                                      f"{layer} on rank {rank}, over its capacity of {cap} per rank and layer")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        try:
            d = json.loads(Path(path).read_text())
            rows, num_ranks = d["rank_of"], int(d["num_ranks"])
            capacity = None if d.get("capacity") is None else int(d["capacity"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read the expert placement {path}: {e}") from e
        # a layer with experts missing (or extra) is the likeliest hand edit: name it
        num_experts = int(d.get("num_experts", len(rows[0]) if rows else 0))
        for layer, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != num_experts:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise InvalidRequestError(f"expert placement {path}: MoE layer {layer} places {got} experts, "
                                          f"not {num_experts}: every expert needs a rank")
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in row):
                raise InvalidRequestError(f"expert placement {path}: MoE layer {layer} has a rank that is not "
                                          "an integer")
        if "num_layers" in d and int(d["num_layers"]) != len(rows):
            raise InvalidRequestError(f"expert placement {path} says {d['num_layers']} layers but places "
                                      f"{len(rows)}")
        return cls(rank_of=np.array(rows, dtype=np.int64).reshape(len(rows), num_experts), num_ranks=num_ranks,
                   method=d.get("method", ""), info=d.get("info", {}), capacity=capacity)


def default_capacity(num_experts: int, num_ranks: int) -> int:
    return math.ceil(num_experts / num_ranks)


def round_robin(num_layers: int, num_experts: int, num_ranks: int) -> Placement:
    """The baseline: expert e on rank e % R in every layer."""
    row = np.arange(num_experts) % num_ranks
    return Placement(np.tile(row, (num_layers, 1)), num_ranks, method="round-robin")


@dataclass
class PairWeights:
    """Expected cross-rank moves as pair weights: inter[l, a, b] (primary a at l, expert b at l+1) and
    intra[l, a, b] (symmetric, primary/secondary of one token at l), in tokens."""

    inter: np.ndarray  # [L-1, E, E]
    intra: np.ndarray  # [L, E, E], symmetric, zero diagonal

    @classmethod
    def from_trace(cls, trace: RoutingTrace) -> PairWeights:
        L, E, k = trace.num_layers, trace.num_experts, trace.top_k
        ex = trace.experts.astype(np.int64)
        inter = np.zeros((max(L - 1, 0), E, E))
        intra = np.zeros((L, E, E))
        for layer in range(L - 1):
            for slot in range(k):
                np.add.at(inter[layer], (ex[layer, :, 0], ex[layer + 1, :, slot]), 1.0)
        for layer in range(L):
            for slot in range(1, k):
                np.add.at(intra[layer], (ex[layer, :, 0], ex[layer, :, slot]), 1.0)
            intra[layer] = intra[layer] + intra[layer].T
            np.fill_diagonal(intra[layer], 0.0)
        return cls(inter=inter, intra=intra)

    def intra_only(self) -> PairWeights:
        """The weights when tokens go back to their sequence's rank after every layer (the two-a2a scheme):
        only a token's experts of one layer sharing a rank saves rows, the next layer's do not matter."""
        return PairWeights(inter=np.zeros_like(self.inter), intra=self.intra)

    def cost(self, placement: Placement) -> float:
        """The pair-cut objective: weighted pairs split over two ranks."""
        r = placement.rank_of
        total = 0.0
        for layer in range(len(self.inter)):
            total += float((self.inter[layer] * (r[layer][:, None] != r[layer + 1][None, :])).sum())
        for layer in range(len(self.intra)):
            total += float((self.intra[layer] * (r[layer][:, None] != r[layer][None, :])).sum()) / 2
        return total


def check_capacity(num_experts: int, num_ranks: int, capacity: int) -> None:
    if num_ranks < 1 or capacity < 1:
        raise InvalidRequestError("ranks and capacity must be at least 1")
    if capacity * num_ranks < num_experts:
        raise InvalidRequestError(f"{num_experts} experts do not fit {num_ranks} ranks of capacity {capacity}")


def solve_ilp(w: PairWeights, num_ranks: int, capacity: int | None = None,
              time_limit: float = 60.0) -> Placement | None:
    """The exact placement by integer programming (HiGHS through scipy.optimize.milp).

    x[l,e,r] binary: expert e of layer l on rank r; y[p,r] in [0,1]: both ends of pair p on rank r
    (y <= x at each end, so maximising sum w_p y[p,r] makes y the co-location indicator). Each expert
    sits on one rank, each rank holds at most `capacity` experts per layer. Ranks are interchangeable, so
    layer 0's expert e may only use ranks <= e (symmetry breaking). Returns None when HiGHS found no
    feasible point within the time limit; on a time-out the best incumbent is returned (info says so)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    L, E = w.intra.shape[0], w.intra.shape[1]
    R = num_ranks
    cap = capacity or default_capacity(E, R)
    check_capacity(E, R, cap)
    # nodes are layer * E + expert; pairs join a layer's primary to the next layer's experts, and a
    # token's primary to its secondaries within a layer
    pairs = [(layer * E + a, (layer + 1) * E + b, float(w.inter[layer, a, b]))
             for layer in range(L - 1) for a, b in zip(*np.nonzero(w.inter[layer]), strict=True)]
    pairs += [(layer * E + a, layer * E + b, float(w.intra[layer, a, b]))
              for layer in range(L) for a in range(E) for b in range(a + 1, E) if w.intra[layer, a, b] > 0]
    nx, ny = L * E * R, len(pairs) * R

    def xv(node: int, r: int) -> int:
        return node * R + r

    rows, cols, vals, lo, hi = [], [], [], [], []
    row = 0
    for node in range(L * E):  # each expert on exactly one rank
        for r in range(R):
            rows.append(row), cols.append(xv(node, r)), vals.append(1.0)
        lo.append(1.0), hi.append(1.0)
        row += 1
    for layer in range(L):  # capacity per rank and layer
        for r in range(R):
            for e in range(E):
                rows.append(row), cols.append(xv(layer * E + e, r)), vals.append(1.0)
            lo.append(0.0), hi.append(float(cap))
            row += 1
    for p, (a, b, _) in enumerate(pairs):  # y[p,r] - x[a,r] <= 0 and y[p,r] - x[b,r] <= 0
        for r in range(R):
            for end in (a, b):
                rows += [row, row]
                cols += [nx + p * R + r, xv(end, r)]
                vals += [1.0, -1.0]
                lo.append(-np.inf), hi.append(0.0)
                row += 1
    A = coo_matrix((vals, (rows, cols)), shape=(row, nx + ny)).tocsr()
    c = np.zeros(nx + ny)
    for p, (_, _, wt) in enumerate(pairs):
        c[nx + p * R: nx + (p + 1) * R] = -wt  # maximise co-located weight
    upper = np.ones(nx + ny)
    for e in range(E):  # symmetry breaking on layer 0
        for r in range(e + 1, R):
            upper[xv(e, r)] = 0.0
    integrality = np.concatenate([np.ones(nx), np.zeros(ny)])
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nx + ny), upper), options={"time_limit": time_limit, "disp": False})
    seconds = time.perf_counter() - t0
    if res.x is None:
        log.info("HiGHS found no placement in %.1fs (%s)", seconds, res.message)
        return None
    x = res.x[:nx].reshape(L, E, R)
    placement = Placement(x.argmax(-1), R, method="ilp")
    placement.info = {"optimal": bool(res.status == 0), "seconds": round(seconds, 2),
                      "mip_gap": None if getattr(res, "mip_gap", None) is None else float(res.mip_gap),
                      "binaries": nx, "pairs": len(pairs), "message": str(res.message)}
    if placement.max_load() > cap:  # cannot happen for a feasible point; guards a rounding surprise
        raise RuntimeError(f"HiGHS returned a placement over capacity {cap}")
    return placement


def _rank_affinity(w: PairWeights, r: np.ndarray, layer: int, R: int) -> np.ndarray:
    """A[e, q]: weight between expert e of `layer` and the experts on rank q (in adjacent layers and its own)."""
    E = r.shape[1]
    a = w.intra[layer] @ np.eye(R)[r[layer]]
    if layer > 0:
        a += w.inter[layer - 1].T @ np.eye(R)[r[layer - 1]]
    if layer < r.shape[0] - 1:
        a += w.inter[layer] @ np.eye(R)[r[layer + 1]]
    return a.reshape(E, R)


def solve_greedy(w: PairWeights, num_ranks: int, capacity: int | None = None, start: Placement | None = None,
                 max_swaps: int = 100_000, time_limit: float = 30.0) -> Placement:
    """Steepest-descent pairwise swaps (and moves into free capacity) within a layer, from round-robin
    (or `start`): every step lowers the pair-cut cost, so the result is never worse than its start."""
    L, E = w.intra.shape[0], w.intra.shape[1]
    R = num_ranks
    cap = capacity or default_capacity(E, R)
    check_capacity(E, R, cap)
    r = (start or round_robin(L, E, R)).rank_of.copy()
    if np.bincount(r.ravel() + R * np.repeat(np.arange(L), E), minlength=L * R).max() > cap:
        raise InvalidRequestError(f"the start placement exceeds capacity {cap}")
    aff = [_rank_affinity(w, r, layer, R) for layer in range(L)]
    t0 = time.perf_counter()
    swaps = 0
    while swaps < max_swaps and time.perf_counter() - t0 < time_limit:
        best_gain, best = 1e-9, None
        for layer in range(L):
            a, rl = aff[layer], r[layer]
            own = a[np.arange(E), rl]
            # swap e1 <-> e2: gain = A[e1, r2] - A[e1, r1] + A[e2, r1] - A[e2, r2] - 2 w(e1, e2)
            gain = a[:, rl] - own[:, None]
            gain = gain + gain.T - 2 * w.intra[layer]
            gain[rl[:, None] == rl[None, :]] = -np.inf
            i = int(np.argmax(gain))
            if gain.flat[i] > best_gain:
                best_gain, best = float(gain.flat[i]), ("swap", layer, i // E, i % E)
            load = np.bincount(rl, minlength=R)  # move e into a rank with room (unequal capacity only)
            move = a - own[:, None]
            move[:, load >= cap] = -np.inf
            move[np.arange(E), rl] = -np.inf
            j = int(np.argmax(move))
            if move.flat[j] > best_gain:
                best_gain, best = float(move.flat[j]), ("move", layer, j // R, j % R)
        if best is None:
            break
        kind, layer, u, v = best
        if kind == "swap":
            r[layer, u], r[layer, v] = r[layer, v], r[layer, u]
        else:
            r[layer, u] = v
        for near in (layer - 1, layer, layer + 1):
            if 0 <= near < L:
                aff[near] = _rank_affinity(w, r, near, R)
        swaps += 1
    return Placement(r, R, method="greedy", info={"swaps": swaps, "seconds": round(time.perf_counter() - t0, 2)})


def solve_layer_ilp(w: PairWeights, rank_of: np.ndarray, layer: int, num_ranks: int, capacity: int,
                    time_limit: float = 10.0) -> np.ndarray | None:
    """The best ranks for one layer's experts with every other layer fixed, exactly (HiGHS): the
    inter-layer cost is then linear in x[e, q] and only the intra-layer pairs need y variables."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    E, R = rank_of.shape[1], num_ranks
    fixed = rank_of.copy()
    fixed[layer] = 0  # the layer's own row is not read by the inter-layer part
    adj = np.zeros((E, R))
    if layer > 0:
        adj += w.inter[layer - 1].T @ np.eye(R)[fixed[layer - 1]]
    if layer < rank_of.shape[0] - 1:
        adj += w.inter[layer] @ np.eye(R)[fixed[layer + 1]]
    pairs = [(a, b, float(w.intra[layer, a, b])) for a in range(E) for b in range(a + 1, E) if w.intra[layer, a, b] > 0]
    nx, ny = E * R, len(pairs) * R
    c = np.concatenate([(adj.sum(1, keepdims=True) - adj).ravel(), np.repeat([-p[2] for p in pairs], R)])
    rows, cols, vals, lo, hi = [], [], [], [], []
    for e in range(E):
        rows += [e] * R
        cols += list(range(e * R, e * R + R))
        vals += [1.0] * R
        lo.append(1.0), hi.append(1.0)
    for q in range(R):
        rows += [E + q] * E
        cols += [e * R + q for e in range(E)]
        vals += [1.0] * E
        lo.append(0.0), hi.append(float(capacity))
    row = E + R
    for p, (a, b, _) in enumerate(pairs):
        for q in range(R):
            for end in (a, b):
                rows += [row, row]
                cols += [nx + p * R + q, end * R + q]
                vals += [1.0, -1.0]
                lo.append(-np.inf), hi.append(0.0)
                row += 1
    A = coo_matrix((vals, (rows, cols)), shape=(row, nx + ny)).tocsr()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=np.r_[np.ones(nx), np.zeros(ny)],
               bounds=Bounds(0, 1), options={"time_limit": time_limit, "disp": False})
    return None if res.x is None else res.x[:nx].reshape(E, R).argmax(1)


def refine_by_layers(w: PairWeights, start: Placement, capacity: int, sweeps: int = 3,
                     time_limit: float = 60.0) -> Placement:
    """Block coordinate descent: re-place one layer at a time exactly (solve_layer_ilp) with the others
    fixed, keeping a change only when the whole cost drops; never worse than `start`."""
    r = start.rank_of.copy()
    best = w.cost(start)
    t0 = time.perf_counter()
    changed = 0
    for _ in range(sweeps):
        improved = False
        for layer in range(r.shape[0]):
            left = time_limit - (time.perf_counter() - t0)
            if left <= 0:
                break
            row = solve_layer_ilp(w, r, layer, start.num_ranks, capacity, time_limit=min(left, 10.0))
            if row is None:
                continue
            trial = r.copy()
            trial[layer] = row
            cost = w.cost(Placement(trial, start.num_ranks))
            if cost < best - 1e-9:
                r, best, improved = trial, cost, True
                changed += 1
        if not improved:
            break
    info = {**start.info, "layer_ilp_changes": changed, "seconds": round(time.perf_counter() - t0, 2)}
    return Placement(r, start.num_ranks, method=f"{start.method}+layer-ilp", info=info)


def solve(trace: RoutingTrace, num_ranks: int, capacity: int | None = None, method: str = "auto",
          time_limit: float = 60.0, ilp_max_binaries: int = 256) -> Placement:
    """The placement for `trace` on `num_ranks` ranks: "ilp" (the whole problem, exact given time),
    "greedy" (swaps), "round-robin", or "auto": greedy swaps then exact per-layer re-placement
    (refine_by_layers, HiGHS), and the whole ILP as well when it has at most `ilp_max_binaries` binaries
    (beyond that HiGHS rarely closes the gap in a minute); the cheapest of those."""
    L, E = trace.num_layers, trace.num_experts
    cap = capacity or default_capacity(E, num_ranks)
    check_capacity(E, num_ranks, cap)
    if method == "round-robin":
        if cap < default_capacity(E, num_ranks):
            raise InvalidRequestError("round-robin needs capacity >= ceil(experts / ranks)")
        return round_robin(L, E, num_ranks)
    if method not in ("ilp", "greedy", "auto"):
        raise InvalidRequestError(f"unknown placement method {method!r} (ilp, greedy, round-robin, auto)")
    w = PairWeights.from_trace(trace)
    candidates = []
    if method in ("greedy", "auto"):
        candidates.append(solve_greedy(w, num_ranks, cap, time_limit=time_limit))
    if method == "auto":
        candidates.append(refine_by_layers(w, candidates[0], cap, time_limit=time_limit))
    if method == "ilp" or (method == "auto" and L * E * num_ranks <= ilp_max_binaries):
        ilp = solve_ilp(w, num_ranks, cap, time_limit=time_limit)
        if ilp is not None:
            candidates.append(ilp)
    if not candidates:
        raise InvalidRequestError(f"HiGHS found no placement within {time_limit}s; try method='greedy'")
    for p in candidates:
        p.info["cost"] = w.cost(p)
    best = min(candidates, key=lambda p: p.info["cost"])
    best.info["candidates"] = {p.method: p.info["cost"] for p in candidates}
    best.capacity = cap
    return best
