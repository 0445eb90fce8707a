"""Cross-rank token moves that a routing trace causes under a placement, for the two ways of running
expert parallelism (the same rules tessera.moe.expert_parallel follows, so its counted bytes match):

  two-a2a   the usual scheme: a token lives on its sequence's rank; each MoE layer sends it to every
            other rank holding one of its experts (dispatch) and the partial outputs back (combine).
  exflow    ExFlow's context-coherent scheme: after a layer the token stays on the rank of its primary
            expert; the next layer sends it only to its experts' ranks other than that one. Secondary
            experts off the new primary's rank send their partial output there (none when top_k == 1,
            which is ExFlow's single all-to-all per layer).

A sequence starts on rank seq % R. A token sent to a rank that holds several of its experts travels
once. Counts are hidden-state rows (one row = hidden_size values).

Under exflow with top_k > 1 the token's new home may be any rank holding one of its experts: the
combine costs the same (one partial row from each other rank), so the choice only decides the next
layer's dispatch. `AffinityHome` picks, among those ranks, the one where the token's next-layer experts
most likely live (conditional frequencies fitted on a trace); the default is the primary expert's rank.

`traffic` turns the moves into everything that crosses ranks per token and MoE layer, in values
(multiply by the element size for bytes): hidden-state rows, and exflow's context coherence, the
all-gather of every token's keys and values to the other R-1 ranks (attention needs a sequence's whole
context on each rank its tokens sit on), which the two-a2a scheme does not pay; and, for comparison, the
engine's replicated scheme (every rank holds every token, one ring all-reduce of the expert outputs:
2 (R-1) H values per token summed over the ranks; tessera/distributed/expert_parallel.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.errors import InvalidRequestError
from tessera.moe.placement import Placement
from tessera.moe.trace import RoutingTrace

SCHEMES = ("two-a2a", "exflow")


class AffinityHome:
    """Where a token lives after an exflow layer: of the ranks holding its experts, the one with the most
    expected next-layer experts, from P[l][e, r] = E[#experts at layer l+1 on rank r | e among the
    token's layer-l experts], fitted on `fit` (a trace) under `placement`. Ties go to the primary's rank."""

    def __init__(self, fit: RoutingTrace, placement: Placement):
        L, E, R = fit.num_layers, fit.num_experts, placement.num_ranks
        self.prob = np.zeros((max(L - 1, 0), E, R))
        for layer in range(L - 1):
            here = fit.experts[layer].astype(np.int64)  # [T, k]
            nxt = placement.rank_of[layer + 1][fit.experts[layer + 1].astype(np.int64)]  # [T, k] ranks
            on_rank = np.zeros((fit.num_tokens, R))
            for slot in range(nxt.shape[1]):
                np.add.at(on_rank, (np.arange(fit.num_tokens), nxt[:, slot]), 1.0)
            counts = np.zeros(E)
            for slot in range(here.shape[1]):
                np.add.at(self.prob[layer], here[:, slot], on_rank)
                np.add.at(counts, here[:, slot], 1.0)
            self.prob[layer] /= np.maximum(counts, 1.0)[:, None]

    def choose(self, layer: int, experts: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """The home rank [T] of tokens with `experts` / their `ranks` [T, k] at `layer`."""
        if layer >= len(self.prob):
            return ranks[:, 0]
        score = self.prob[layer][experts].sum(1)  # [T, R]
        cand = np.take_along_axis(score, ranks, 1)  # [T, k]
        cand[:, 0] += 1e-9  # ties: the primary
        return np.take_along_axis(ranks, cand.argmax(1)[:, None], 1)[:, 0]


@dataclass
class Moves:
    dispatch: np.ndarray  # [L] rows sent to another rank before the experts
    combine: np.ndarray  # [L] rows sent to another rank after them
    num_tokens: int

    @property
    def per_layer(self) -> np.ndarray:
        return self.dispatch + self.combine

    @property
    def total(self) -> int:
        return int(self.per_layer.sum())

    def per_token_layer(self) -> float:
        return self.total / max(self.num_tokens * len(self.dispatch), 1)


def distinct_off_rank(ranks: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Per token, how many distinct ranks among `ranks` [T, k] differ from `home` [T]."""
    off = ranks != home[:, None]
    count = off[:, 0].astype(np.int64)
    for slot in range(1, ranks.shape[1]):
        first = np.all(ranks[:, :slot] != ranks[:, slot:slot + 1], axis=1)
        count += off[:, slot] & first
    return count


def origin_ranks(trace: RoutingTrace, num_ranks: int) -> np.ndarray:
    return trace.seq_ids() % num_ranks


def count_moves(trace: RoutingTrace, placement: Placement, scheme: str, home: AffinityHome | None = None) -> Moves:
    if scheme not in SCHEMES:
        raise InvalidRequestError(f"unknown scheme {scheme!r}: {', '.join(SCHEMES)}")
    if placement.rank_of.shape != (trace.num_layers, trace.num_experts):
        raise InvalidRequestError(f"placement is {placement.rank_of.shape}, trace has "
                                  f"{trace.num_layers} layers x {trace.num_experts} experts")
    L, policy = trace.num_layers, home
    home = origin_ranks(trace, placement.num_ranks)
    dispatch, combine = np.zeros(L, np.int64), np.zeros(L, np.int64)
    for layer in range(L):
        ranks = placement.rank_of[layer][trace.experts[layer].astype(np.int64)]  # [T, k]
        dispatch[layer] = distinct_off_rank(ranks, home).sum()
        if scheme == "exflow":  # the token stays with its primary expert (or the one `policy` picks)
            home = ranks[:, 0] if policy is None else policy.choose(layer, trace.experts[layer].astype(np.int64), ranks)
        combine[layer] = distinct_off_rank(ranks, home).sum()
    return Moves(dispatch, combine, trace.num_tokens)


def attention_ranks(trace: RoutingTrace, placement: Placement, home: AffinityHome | None = None) -> np.ndarray:
    """[L, T]: the rank each token sits on when it runs layer l's attention under exflow (its sequence's
    rank at layer 0, then where the previous layer left it)."""
    L = trace.num_layers
    where = np.empty((L, trace.num_tokens), np.int64)
    where[0] = origin_ranks(trace, placement.num_ranks)
    for layer in range(L - 1):
        ex = trace.experts[layer].astype(np.int64)
        ranks = placement.rank_of[layer][ex]
        where[layer + 1] = ranks[:, 0] if home is None else home.choose(layer, ex, ranks)
    return where


def kv_needed(trace: RoutingTrace, where: np.ndarray, num_ranks: int) -> float:
    """K/V rows sent per token per layer when each token's keys and values go only to the ranks that run
    a later token of its sequence (causal attention needs no earlier one) instead of to all R-1: the
    least a prefill needs. Sums over layers, divided by tokens x layers."""
    seq = trace.seq_ids()
    last = trace.seq_offsets[1:][seq] - 1  # the last token of each token's sequence
    total = 0
    for layer in range(where.shape[0]):
        for q in range(num_ranks):
            on_q = (where[layer] == q).astype(np.int64)
            suffix = np.cumsum(on_q[::-1])[::-1]  # tokens on q from t to the end
            after = suffix - np.r_[suffix[1:], 0][last]  # ... within t's sequence only
            total += int(((after > 0) & (where[layer] != q)).sum())
    return total / max(trace.num_tokens * where.shape[0], 1)


def traffic(trace: RoutingTrace, placement: Placement, scheme: str, hidden_size: int, kv_width: int,
            home: AffinityHome | None = None, kv_mode: str = "all-gather") -> dict:
    """Values crossing ranks per token per MoE layer (summed over ranks): `hidden` (token rows x H),
    `kv` (exflow's context coherence; kv_width = 2 x KV heads x head_dim; kv_mode "all-gather": to every
    other rank, as tessera.moe.expert_parallel does; "needed": only to the ranks running a later token of
    the sequence), `total`, and `rows` (hidden-state rows alone). scheme "replicated": the engine's
    all-reduce instead (no rows move)."""
    R = placement.num_ranks
    if scheme == "replicated":
        return {"rows": 0.0, "hidden": 2.0 * (R - 1) * hidden_size, "kv": 0.0, "total": 2.0 * (R - 1) * hidden_size}
    rows = count_moves(trace, placement, scheme, home).per_token_layer()
    kv = 0.0
    if scheme == "exflow":
        if kv_mode not in ("all-gather", "needed"):
            raise InvalidRequestError(f"kv_mode must be all-gather or needed, got {kv_mode!r}")
        kv_rows = R - 1 if kv_mode == "all-gather" else kv_needed(trace, attention_ranks(trace, placement, home), R)
        kv = float(kv_rows * kv_width)
    return {"rows": rows, "hidden": rows * hidden_size, "kv": kv, "total": rows * hidden_size + kv}
