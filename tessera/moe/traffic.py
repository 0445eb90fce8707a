"""Cross-rank token moves that a routing trace causes under a placement, for the two ways of running
expert parallelism (the same rules tessera.moe.expert_parallel follows, so its counted bytes match):

  two-a2a   the usual scheme: a token lives on its sequence's rank; each MoE layer sends it to every
            other rank holding one of its experts (dispatch) and the partial outputs back (combine).
  exflow    ExFlow's context-coherent scheme: after a layer the token stays on the rank of its primary
            expert; the next layer sends it only to its experts' ranks other than that one. Secondary
            experts off the new primary's rank send their partial output there (none when top_k == 1,
            which is ExFlow's single all-to-all per layer).

A sequence starts on rank seq % R. A token sent to a rank that holds several of its experts travels
once. Counts are hidden-state rows (one row = hidden_size values)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.errors import InvalidRequestError
from tessera.moe.placement import Placement
from tessera.moe.trace import RoutingTrace

SCHEMES = ("two-a2a", "exflow")


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


def count_moves(trace: RoutingTrace, placement: Placement, scheme: str) -> Moves:
    if scheme not in SCHEMES:
        raise InvalidRequestError(f"unknown scheme {scheme!r}: {', '.join(SCHEMES)}")
    if placement.rank_of.shape != (trace.num_layers, trace.num_experts):
        raise InvalidRequestError(f"placement is {placement.rank_of.shape}, trace has "
                                  f"{trace.num_layers} layers x {trace.num_experts} experts")
    L = trace.num_layers
    home = origin_ranks(trace, placement.num_ranks)
    dispatch, combine = np.zeros(L, np.int64), np.zeros(L, np.int64)
    for layer in range(L):
        ranks = placement.rank_of[layer][trace.experts[layer].astype(np.int64)]  # [T, k]
        dispatch[layer] = distinct_off_rank(ranks, home).sum()
        if scheme == "exflow":
            home = ranks[:, 0]  # the token stays with its primary expert
        combine[layer] = distinct_off_rank(ranks, home).sum()
    return Moves(dispatch, combine, trace.num_tokens)
