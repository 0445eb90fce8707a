"""Turns a scheduled step into one flat batch, runs the model and returns the logits to sample from.

The flat batch holds the one-token decodes first, then the prefill chunks; only the rows that end a
sequence's known tokens go through the LM head.
"""

from __future__ import annotations

import torch

from tessera.engine.block_manager import NULL_BLOCK, paged_slots
from tessera.engine.logprobs import logprob_entries
from tessera.engine.scheduler import ScheduledSeq
from tessera.models.llama import LlamaForCausalLM
from tessera.ops.attention import AttentionMetadata
from tessera.ops.backend import StepLayout, choose_backend, to_device
from tessera.ops.linear import choose_linear_method, prepare_linears


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, quantization=None, progress: bool = False, lora=None,
                 allow_packing: bool = True, variants=None):
        """lora: a tessera.lora.LoRAManager; its method is put over the linears it holds slots for, and
        each step's rows are handed to it before the forward. allow_packing=False keeps dense weights
        (weight streaming: a packed copy would double the resident bytes). variants: a
        tessera.blockllm.VariantSet (several models sharing blocks); its differing blocks get their
        per-variant products and each step's rows are handed over as LoRA's are."""
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = device
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Left uninitialised (the OS commits pages as they are written), except the null block that
        # padded reads land on: it must hold finite values.
        self.kv_cache = torch.empty(shape, dtype=dtype, device=device)
        self.kv_cache[:, :, NULL_BLOCK].zero_()
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        self.backend = choose_backend(device)
        # A bar only when quantizing: repacking takes well under a second.
        self.linear_method = prepare_linears(model, choose_linear_method(device, dtype, quantization, allow_packing),
                                             progress and quantization is not None)
        self.lora = lora
        if lora is not None:
            from tessera.lora.layer import LoRALinearMethod

            method = LoRALinearMethod(self.linear_method, lora)
            for _, _, lin in lora.layers:
                lin.method = method
        self.variants = None
        if variants is not None:
            from tessera.blockllm.runtime import VariantManager

            self.variants = VariantManager(variants, model, self.linear_method)
        self.dtype = dtype
        self.sparse_kv = None  # tessera.longctx.sparse.SparseKV, made when a sparse request first decodes
        self.current_batch: list[ScheduledSeq] | None = None  # set while run() runs the model
        self.graphs = None  # a tessera.engine.cuda_graphs.DecodeGraphs once captured (CUDA, not enforce_eager)

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        return model_cfg.num_layers * 2 * block_size * model_cfg.num_kv_heads * model_cfg.head_dim * elt

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        return paged_slots(table, range(start, end), self.block_size)

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                          list[int], list[tuple]]:
        # Dense decodes, then sparse ones (tessera.longctx.sparse), then prefill chunks. A prompt's
        # last token computed alone is a one-token decode too, but always a dense one: prompts are
        # read in full.
        def sparse_decode(s: ScheduledSeq) -> bool:
            return s.seq.sparse is not None and s.seq.num_computed_tokens >= s.seq.num_prompt_tokens

        dense = [s for s in batch if s.num_new_tokens == 1 and not sparse_decode(s)]
        sparse = [s for s in batch if s.num_new_tokens == 1 and sparse_decode(s)]
        prefills = [s for s in batch if s.num_new_tokens > 1]
        lora, variants = self.lora, self.variants
        if lora is not None:  # each adapter's rows contiguous: its LoRA is one GEMM pair per group
            for group in (dense, sparse, prefills):
                group.sort(key=lambda s: lora.slot_of(s.seq))
        if variants is not None:  # each variant's rows contiguous: one product per version at a split
            for group in (dense, sparse, prefills):
                group.sort(key=lambda s: s.seq.variant_index)
        decodes = dense + sparse
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for item in ordered:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq.block_table, start, start + n))
        layout = StepLayout([s.seq.block_table for s in ordered], [s.seq.num_computed_tokens for s in ordered],
                            [s.num_new_tokens for s in ordered], len(decodes), self.block_size, NULL_BLOCK)
        cu = layout.cu_seqlens
        dev = self.device
        # Prompt positions in this step still to be scored (Sequence.scored_positions): (seq, position, row).
        scored = []
        for k, item in enumerate(ordered):
            seq = item.seq
            if not (seq.prompt_entropies or seq.prompt_logprobs):
                continue
            start = seq.num_computed_tokens
            scored.extend((seq, p, cu[k] + p - start) for p in seq.scored_positions(start, start + item.num_new_tokens))
        ids = to_device(input_ids, torch.long, dev)
        pos = to_device(positions, torch.long, dev)
        meta = self.backend.build_metadata(layout, to_device(slots, torch.long, dev), pos)
        meta.layout = layout
        meta.observe = self._prompt_observer(ordered, cu)
        if lora is not None:
            lora.set_step([s.num_new_tokens for s in ordered], [lora.slot_of(s.seq) for s in ordered], len(decodes))
        if variants is not None:
            variants.set_step([s.num_new_tokens for s in ordered], [s.seq.variant_index for s in ordered])
        if sparse:
            meta.sparse = self._sparse_step([s.seq for s in sparse], slice(len(dense), len(decodes)), meta)
        # The sampling rows, in the caller's order of `batch`.
        last_row = {id(item): cu[k + 1] - 1 for k, item in enumerate(ordered)}
        rows = [last_row[id(item)] for item in batch if item.samples]
        return ids, pos, meta, rows, scored

    def _prompt_observer(self, ordered: list[ScheduledSeq], cu: list[int]):
        """Sparse requests prefilling the end of their prompts observe it (tessera.longctx.sparse)."""
        if not any(item.seq.sparse is not None for item in ordered):
            return None
        from tessera.longctx.sparse import PromptObserver

        chunks = [PromptObserver.chunk(item.seq, cu[k], item.seq.num_computed_tokens, item.num_new_tokens)
                  for k, item in enumerate(ordered)]
        chunks = [c for c in chunks if c is not None]
        return PromptObserver(chunks, self.block_size, self.device) if chunks else None

    def _sparse_step(self, seqs: list, rows: slice, meta: AttentionMetadata):
        from tessera.longctx.sparse import SparseKV

        if self.sparse_kv is None:
            self.sparse_kv = SparseKV(self.model.cfg, self.kv_caches, self.block_size, self.dtype, self.device)
        step = self.sparse_kv.plan(seqs, rows)
        step.dense_meta = self.backend.dense_view(meta, rows.start)  # the step as the dense rows see it
        return step

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], all_rows: bool = False) -> torch.Tensor:
        """Returns fp32 logits [num_sampling_seqs, vocab], in the order of `batch`'s sampling items
        (with all_rows, the logits of every token of the flat batch, decodes first: for tests).
        Prompt entropies and prompt logprobs that were asked for are written into their sequences."""
        ids, pos, meta, rows, scored = self.prepare(batch)
        # The step being run, for observers of the layers (a fleet instance streams each layer's new K/V
        # to its partner as the layer writes it: tessera.fleet.layer_stream).
        self.current_batch = batch
        try:
            try:
                hidden = self.forward(ids, pos, meta)
            finally:
                self.current_batch = None
                if meta.sparse is not None:
                    meta.sparse.finish()
                if self.lora is not None:
                    self.lora.clear_step()
            if scored:
                self._score(hidden, scored)
            if all_rows:
                return self.model.compute_logits(hidden)
            if not rows:
                return hidden.new_empty((0, self.model.cfg.vocab_size), dtype=torch.float32)
            return self._logits(hidden, rows)
        finally:
            if self.variants is not None:
                self.variants.clear_step()

    def _logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The logits of `rows` of the step's hidden states (per-variant LM heads see those rows)."""
        variants = self.variants
        saved = variants.step if variants is not None else None
        if variants is not None:
            variants.narrow(rows)
        try:
            return self.model.compute_logits(hidden[to_device(rows, torch.long, hidden.device)])
        finally:
            if variants is not None:
                variants.step = saved

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model over one prepared flat batch: its final hidden states. (Parallel runners,
        tessera/distributed, send the batch to their other ranks here first.)"""
        if self.graphs is not None and self.graphs.can_replay(ids, meta):
            return self.graphs.replay(ids, pos, meta)
        return self.model(ids, pos, self.kv_caches, meta)

    def _score(self, hidden: torch.Tensor, scored: list[tuple]) -> None:
        """The scored rows' next-token distributions (fp32 log_softmax of the logits, the raw model's),
        a slice at a time since each row's logits span the vocab: the entropy where it is wanted, and
        the logprob (rank, top-N) of the prompt token that follows where prompt logprobs are."""
        for at in range(0, len(scored), 256):
            part = scored[at:at + 256]
            logp = torch.log_softmax(self._logits(hidden, [r for _, _, r in part]), dim=-1)
            ent = [j for j, (seq, p, _) in enumerate(part) if seq.wants_entropy(p)]
            if ent:
                sub = logp[torch.tensor(ent, device=logp.device)]
                for j, e in zip(ent, (-(sub.exp() * sub).sum(-1)).tolist(), strict=True):
                    seq, p, _ = part[j]
                    seq.prompt_entropies[p - (seq.num_prompt_tokens - len(seq.prompt_entropies))] = e
            lps = [j for j, (seq, p, _) in enumerate(part) if seq.wants_prompt_logprob(p)]
            if lps:
                entries = logprob_entries(logp[torch.tensor(lps, device=logp.device)],
                                          [part[j][0].token_ids[part[j][1] + 1] for j in lps],
                                          [part[j][0].params.prompt_logprobs for j in lps])
                for j, entry in zip(lps, entries, strict=True):
                    seq, p, _ = part[j]
                    seq.prompt_logprobs[p] = entry
