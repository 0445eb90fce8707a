"""Routing traces: which experts each token takes in each MoE layer, saved as a compact .npz file.

A trace holds `experts` [layers, tokens, top_k] (uint8/uint16, each token's experts in descending router
weight: slot 0 is its primary expert) and `seq_offsets` [sequences + 1] (token ranges of the sequences,
which matter because a sequence starts on one rank). `affinity` summarises how strongly a token's expert
in one layer predicts its expert in the next (ExFlow's inter-layer expert affinity)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tessera.errors import InvalidRequestError, ModelLoadError


@dataclass
class RoutingTrace:
    experts: np.ndarray  # [L, T, k] expert ids, slot 0 = highest router weight
    seq_offsets: np.ndarray  # [S + 1] int64, token ranges of the sequences
    num_experts: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.experts.ndim != 3:
            raise InvalidRequestError(f"a routing trace is [layers, tokens, top_k]; got shape {self.experts.shape}")
        if self.seq_offsets[0] != 0 or self.seq_offsets[-1] != self.num_tokens or np.any(np.diff(self.seq_offsets) < 0):
            raise InvalidRequestError("seq_offsets must rise from 0 to the number of tokens")
        if self.experts.size and int(self.experts.max()) >= self.num_experts:
            raise InvalidRequestError(f"expert id {int(self.experts.max())} >= num_experts {self.num_experts}")

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def seq_ids(self) -> np.ndarray:
        """The sequence index of every token: [T]."""
        return np.repeat(np.arange(len(self.seq_offsets) - 1), np.diff(self.seq_offsets))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        dtype = np.uint8 if self.num_experts <= 256 else np.uint16
        np.savez_compressed(path, experts=self.experts.astype(dtype), seq_offsets=self.seq_offsets.astype(np.int64),
                            num_experts=np.int64(self.num_experts), meta=np.array(json.dumps(self.meta)))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls(experts=f["experts"], seq_offsets=f["seq_offsets"], num_experts=int(f["num_experts"]),
                           meta=json.loads(str(f["meta"])))
        except (OSError, KeyError, ValueError) as e:
            raise ModelLoadError(f"cannot read the routing trace {path}: {e}") from e


@torch.no_grad()
def collect_trace(model, sequences, batch_size: int = 16, meta: dict | None = None) -> RoutingTrace:
    """Run an HF MoE model (Qwen3-MoE / Mixtral: each layer's `mlp.gate` returns (logits, weights, indices))
    over `sequences` (a [N, len] tensor or a list of token lists) and record the experts its routers pick."""
    layers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    if not layers:
        raise InvalidRequestError("the model has no MoE layers (no mlp.gate router)")
    seqs = [list(map(int, s)) for s in sequences]
    picked: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i):
        def record(_module, _inputs, output):
            picked[i].append(output[2].detach().to(torch.int16))  # router_indices [tokens, top_k]
        return record

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(layers)]
    try:
        model.eval()
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start:start + batch_size]
            if len({len(s) for s in batch}) == 1:  # rows of a batch are traced in order, row-major
                model(input_ids=torch.tensor(batch))
            else:
                for s in batch:
                    model(input_ids=torch.tensor([s]))
    finally:
        for h in handles:
            h.remove()
    experts = torch.stack([torch.cat(p) for p in picked]).numpy()
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return RoutingTrace(experts=experts, seq_offsets=offsets, num_experts=layers[0].num_experts, meta=meta or {})


def transition_counts(trace: RoutingTrace) -> np.ndarray:
    """[L-1, E, E]: tokens whose primary expert is e in layer l and e' in layer l+1."""
    E = trace.num_experts
    prim = trace.experts[:, :, 0].astype(np.int64)
    out = np.zeros((trace.num_layers - 1, E, E), dtype=np.int64)
    for layer in range(trace.num_layers - 1):
        np.add.at(out[layer], (prim[layer], prim[layer + 1]), 1)
    return out


def affinity(trace: RoutingTrace) -> dict:
    """Inter-layer affinity of the primary experts, averaged over consecutive layer pairs:
    `top1_conditional` = E_e[max_e' P(e' | e)], how often the likeliest next expert given this one is
    right, against `marginal_top1` = max_e' P(e'), the same guess without knowing this layer's expert
    (uniform routing: both 1/E); `mutual_information_bits` between consecutive layers' primaries
    (independent routing: 0); and the usage balance (max / mean expert load)."""
    counts = transition_counts(trace).astype(np.float64)
    E = trace.num_experts
    top1, marginal, mi = [], [], []
    for c in counts:
        total = c.sum()
        p = c / total
        row = p.sum(1, keepdims=True)
        col = p.sum(0, keepdims=True)
        top1.append(float(c.max(1).sum() / total))
        marginal.append(float(col.max()))
        nz = p > 0
        mi.append(float((p[nz] * np.log2(p[nz] / (row @ col)[nz])).sum()))
    load = np.stack([np.bincount(trace.experts[layer].ravel(), minlength=E) for layer in range(trace.num_layers)])
    return {"top1_conditional": round(float(np.mean(top1)), 4), "marginal_top1": round(float(np.mean(marginal)), 4),
            "uniform_top1": round(1 / E, 4),
            "mutual_information_bits": round(float(np.mean(mi)), 4),
            "max_bits": round(float(np.log2(E)), 4),
            "load_imbalance": round(float((load.max(1) / load.mean(1)).mean()), 3)}


def essay_traces(model_dir: str | Path, seq_len: int | None = None) -> dict[str, RoutingTrace]:
    """Traces of a `tessera moe-train` checkpoint over its training and held-out essays (windows of the
    training length), and of the same architecture untrained (seeded init: the no-affinity reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tessera.moe.train import MoeTrainConfig, chunks, load_split, read_meta

    cfg = MoeTrainConfig(**read_meta(model_dir)["train_config"])
    split = load_split(model_dir)
    length = seq_len or cfg.seq_len
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for name, streams in (("train", split.train), ("held-out", split.held_out)):
        out[name] = collect_trace(model, chunks(streams, length), meta={"model": str(model_dir), "split": name,
                                                                        "seq_len": length})
    torch.manual_seed(cfg.seed)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    out["untrained"] = collect_trace(untrained, chunks(split.held_out, length),
                                     meta={"model": "untrained", "split": "held-out", "seq_len": length})
    return out
