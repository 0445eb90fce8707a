"""Synthetic routing traces with inter-layer expert affinity, for the MoE placement tests."""

from __future__ import annotations

import numpy as np

from tessera.moe.trace import RoutingTrace


def markov_trace(num_layers: int, num_experts: int, top_k: int, seqs: int, seq_len: int, seed: int,
                 chain_seed: int | None = None, stickiness: float = 6.0) -> RoutingTrace:
    """Routing with inter-layer affinity: each layer's primary follows a random sparse transition matrix
    (fixed by `chain_seed`), secondaries drawn from the primary's row. `seed` draws the tokens."""
    chain = np.random.default_rng(seed if chain_seed is None else chain_seed)
    trans = chain.dirichlet(np.full(num_experts, 1.0 / stickiness), size=(num_layers, num_experts))
    rng = np.random.default_rng(seed + 1000)
    T = seqs * seq_len
    ex = np.zeros((num_layers, T, top_k), dtype=np.int64)
    prev = rng.integers(num_experts, size=T)
    for layer in range(num_layers):
        for t in range(T):
            ex[layer, t] = rng.choice(num_experts, size=top_k, replace=False, p=trans[layer, prev[t]])
        prev = ex[layer, :, 0]
    return RoutingTrace(ex, np.arange(0, T + 1, seq_len), num_experts)
