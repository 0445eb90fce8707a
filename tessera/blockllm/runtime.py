"""Running the variants' rows through shared blocks: one step plan, and per kind of block the piece
that splits the rows where the variants' versions differ.

The runner orders each step's rows by variant (decodes, then prefill chunks, each sorted), so a
variant's rows are contiguous runs (`VariantStep.runs`). A block every variant shares runs once over
the whole batch, as without variants. At a block that differs, each maximal run of rows whose
variants use the same version is one call of the block's own product on that row range
(`VariantStep.segments`: variants that share the version run together), so a step costs one GEMM per
distinct version present at each differing block, never one per request:

- linears (q/k/v, o, gate/up, down, an untied LM head; a tied one follows the embeddings):
  `VariantLinearMethod` over the engine's LinearMethod (tessera/ops/linear.py); every version is a
  Linear prepared by that method (oneDNN-packed on CPUs), version 0 the model's own;
- RMSNorms: `VariantRMSNorm` scales each row by its version's weight (one gather, the same products);
- the embeddings: `VariantEmbedding` looks a run's tokens up in its version's table.

The LM head sees only the sampled rows: the runner narrows the step to them (`VariantManager.narrow`)
before computing logits. Steps whose rows are all on the first variant are plain steps (no plan).
Decode steps of any mix of variants run in the C++ decode stack (tessera/ops/fused_decode.py) when
the layers' norms are shared: each differing linear carries every version's product and the step's
variant runs (`VariantLinearMethod.prepare_fused_step`), split as `apply` splits them (the same bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tessera.blockllm.store import VariantSet
from tessera.ops.linear import Linear, LinearMethod
from tessera.ops.norm import RMSNorm


@dataclass
class VariantStep:
    """Each row's variant (`row_variant`, rows ordered so that a variant's rows are contiguous where the
    runner could) and, computed once per step for each distinct `version_of` map, the row ranges of
    one version each and the per-row version index."""

    row_variant: list[int]
    _segments: dict = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)

    def segments(self, version_of: tuple[int, ...]) -> list[tuple[int, int, int]]:
        seg = self._segments.get(version_of)
        if seg is None:
            seg = []
            for r, v in enumerate(self.row_variant):
                version = version_of[v]
                if seg and seg[-1][2] == version:
                    seg[-1] = (seg[-1][0], r + 1, version)
                else:
                    seg.append((r, r + 1, version))
            self._segments[version_of] = seg
        return seg

    def runs(self) -> list[tuple[int, int, int]]:
        """The maximal row ranges of one variant each: (start, end, variant)."""
        return self.segments(tuple(range(max(self.row_variant) + 1)))

    def row_versions(self, version_of: tuple[int, ...], device) -> torch.Tensor:
        idx = self._rows.get(version_of)
        if idx is None:
            idx = torch.tensor([version_of[v] for v in self.row_variant], device=device)
            self._rows[version_of] = idx
        return idx


class VariantManager:
    """The engine's variants (a VariantSet) and the step the blocks read."""

    def __init__(self, variant_set: VariantSet, model, method: LinearMethod):
        self.set = variant_set
        self.step: VariantStep | None = None
        self.linear_method = VariantLinearMethod(method, self)
        self.tied_head = model.lm_head if model.cfg.tie_word_embeddings else None
        for block in variant_set.differing:
            install(block, self)

    @property
    def variants(self):
        return self.set.variants

    def set_step(self, row_counts: list[int], variant_index: list[int]) -> None:
        rows = [v for n, v in zip(row_counts, variant_index, strict=True) for _ in range(n)]
        self.step = VariantStep(rows) if any(rows) else None

    def narrow(self, rows: list[int]) -> None:
        """The rows the next product sees are `rows` of the step (the LM head's sampled rows)."""
        if self.step is not None:
            full = self.step.row_variant
            self.step = VariantStep([full[r] for r in rows]) if any(full[r] for r in rows) else None

    def clear_step(self) -> None:
        self.step = None


def install(block, manager: VariantManager) -> None:
    """Give a differing block its per-version product."""
    module, version_of = block.module, tuple(block.version_of)
    if isinstance(module, Linear):
        _install_linear(module, block.versions, version_of, manager)
        return
    # The module's class is swapped in place rather than the module replaced: the model, the decode
    # stack's watch list and the tied LM head keep their references.
    if isinstance(module, RMSNorm):
        module.__class__ = VariantRMSNorm
        module.stacked = torch.stack([v["weight"] for v in block.versions])
    elif isinstance(module, nn.Embedding):
        module.__class__ = VariantEmbedding
        module.version_weights = [v["weight"] for v in block.versions]
        model_head = manager.tied_head
        if model_head is not None:  # a tied LM head reads the embeddings: it follows their versions
            _install_linear(model_head, block.versions, version_of, manager)
    else:
        raise TypeError(f"no per-variant product for {type(module).__name__}")
    module.version_of, module.manager = version_of, manager


def _install_linear(layer: Linear, versions: list[dict], version_of: tuple[int, ...], manager) -> None:
    method = manager.linear_method
    holders: list[Linear] = [layer]
    for v in versions[1:]:
        h = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        h.weight = nn.Parameter(v["weight"], requires_grad=False)
        if layer.bias is not None:
            h.bias = nn.Parameter(v["bias"], requires_grad=False)
        method.base.process_weights(h)
        holders.append(h)
    layer.variant_versions, layer.version_of = holders, version_of
    layer.method = method


class VariantLinearMethod(LinearMethod):
    """A differing linear: each version's rows through the base method with that version's weights."""

    def __init__(self, base: LinearMethod, manager: VariantManager):
        self.base, self.manager = base, manager
        self.name = f"{base.name} per variant"

    def process_weights(self, layer: Linear) -> None:
        self.base.process_weights(layer)

    def decode_op(self, layer: Linear, stack_cls):
        # Every version's base product, and which variant runs which: the stack splits a step's rows
        # where the versions differ, as apply() does (prepare_fused_step hands it the step's runs).
        if not hasattr(self.base, "decode_op") or not hasattr(stack_cls, "with_versions"):
            return None
        ops = [self.base.decode_op(h, stack_cls) for h in layer.variant_versions]
        if any(op is None for op in ops):
            return None
        return stack_cls.with_versions(ops[0], ops[1:], list(layer.version_of))

    def prepare_fused_step(self, stack) -> None:
        step = self.manager.step
        if step is None:
            stack.clear_variant_step()
        else:
            stack.set_variant_step(step.runs())

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        step = self.manager.step
        if step is None:
            return self.base.apply(layer, x)
        segs = step.segments(layer.version_of)
        if len(segs) == 1:
            return self.base.apply(layer.variant_versions[segs[0][2]], x)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty(x2.shape[0], layer.out_features)
        for a, b, v in segs:
            y[a:b] = self.base.apply(layer.variant_versions[v], x2[a:b])
        return y.view(*x.shape[:-1], layer.out_features)


class VariantRMSNorm(RMSNorm):
    """An RMSNorm whose weight differs between variants: each row scaled by its version's weight."""

    per_row = True
    stacked: torch.Tensor  # [versions, dim]
    version_of: tuple[int, ...]
    manager: VariantManager

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        step = self.manager.step
        if step is None:
            return super().forward(x, residual)
        h, residual = self.normalize(x, residual)
        w = self.stacked.index_select(0, step.row_versions(self.version_of, x.device))
        out = w.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]) * h
        return out if residual is None else (out, residual)


class VariantEmbedding(nn.Embedding):
    """Embeddings that differ between variants: each run of rows looked up in its version's table."""

    version_weights: list[torch.Tensor]
    version_of: tuple[int, ...]
    manager: VariantManager

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        step = self.manager.step
        if step is not None:
            for a, b, v in step.segments(self.version_of):
                if v:
                    out[a:b] = F.embedding(ids[a:b], self.version_weights[v])
        return out
