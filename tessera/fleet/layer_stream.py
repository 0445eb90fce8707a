"""Streaming a prefill's K/V to the partner layer by layer, as each layer writes it (AcceLLM).

A forward hook on every decoder layer reads the rows that layer just wrote for the prefill chunks of
replicated requests in the running step (ModelRunner.current_batch) and sends them to the partner at
once, so the copy grows while the later layers compute instead of after the step. Decode steps (one row
per request, and on CPU all layers fused into one call) go whole after the step (EngineInstance): thirty
messages of one row each would cost more than they overlap.

Layers go in groups of LAYERS_PER_MESSAGE, one message per group: on a CPU fleet whose instances share
the cores, a Ray message per layer (thirty per prefill chunk of the default model) made accellm's
prefill steps take twice as long as the other policies' (each message's sending, receiving and applying
compete with the steps); three messages keep most of the overlap for a tenth of that.
"""

from __future__ import annotations

import torch

from tessera.engine.block_manager import paged_slots

MIN_ROWS = 2  # chunks of at least this many rows go layer by layer
LAYERS_PER_MESSAGE = 10


class LayerStreamer:
    def __init__(self, instance):
        self.instance = instance
        eng = instance.engine
        self.runner = eng.runner
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(eng.model.layers)]
        self.num_layers = len(eng.model.layers)
        self.chunks_sent = 0  # prefill chunks sent whole, layer by layer
        self.group: dict[str, list[torch.Tensor]] = {}  # request id -> rows of the layers not sent yet

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _items(self):
        """(request id, replication, start, n, seq) of this step's chunks that stream layer by layer: the
        chunk must follow on the rows already sent."""
        batch = self.runner.current_batch or ()
        reps = self.instance.replicating
        for item in batch:
            rep = reps.get(item.seq.request_id)
            if rep is not None and item.num_new_tokens >= MIN_ROWS and item.seq.num_computed_tokens == rep.sent:
                yield item.seq.request_id, rep, item.seq.num_computed_tokens, item.num_new_tokens, item.seq

    def _hook(self, layer: int):
        def hook(module, inputs, output) -> None:
            items = list(self._items())
            if not items:
                return
            cache = self.runner.kv_cache[layer]  # [2, blocks, block_size, heads, dim]
            flat = cache.view(2, -1, *cache.shape[3:])
            bs = cache.shape[2]
            last = layer == self.num_layers - 1
            for rid, rep, start, n, seq in items:
                slots = torch.tensor(paged_slots(seq.block_table, range(start, start + n), bs), dtype=torch.long)
                rows = flat.index_select(1, slots.to(flat.device)).cpu()
                group = self.group.setdefault(rid, [])
                if layer % LAYERS_PER_MESSAGE == 0:
                    group.clear()
                group.append(rows)
                if (layer + 1) % LAYERS_PER_MESSAGE and not last:
                    continue
                first = layer + 1 - len(group)
                self.instance.peers[rep.peer].send("copy_layer_rows", rid, list(seq.token_ids), first, start,
                                                   torch.stack(group))
                del self.group[rid]
                if last:
                    rep.layer_sent = start + n  # the step's end moves `sent` past these rows
                    self.chunks_sent += 1
        return hook
