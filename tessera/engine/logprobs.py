"""Logprob entries from rows of log-probabilities: the one place both the sampler (generated tokens)
and the model runner (prompt tokens) build their {token_id: Logprob} dicts."""

from __future__ import annotations

import torch

from tessera.outputs import Logprob


def logprob_entries(logp: torch.Tensor, chosen: list[int], num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row of `logp` [rows, vocab]: the chosen token's Logprob (rank 1 + the tokens the model found
    more likely, as vLLM) plus the row's top num_top[i] tokens, most likely first. One pass over the
    rows for the ranks and one top-k, not a loop over rows."""
    if not chosen:
        return []
    idx = torch.tensor(chosen, dtype=torch.long, device=logp.device)
    own = logp.gather(1, idx[:, None])
    ranks = ((logp > own).sum(-1) + 1).tolist()
    own_list = own[:, 0].tolist()
    k = max(num_top)
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k:
        vals, ids = logp.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    out = []
    for i, t in enumerate(chosen):
        entry = {t: Logprob(t, own_list[i], ranks[i])}
        for r, (tid, v) in enumerate(tops[i][: num_top[i]], start=1):
            entry.setdefault(tid, Logprob(tid, v, r))
        out.append(entry)
    return out
