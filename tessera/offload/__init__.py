"""Models larger than memory: a resident weight budget (`weight_memory`), the rest streamed from disk.

- plan.py: which layers stay resident (evenly spread, so reading never idles), the budget check, and
  the throughput mode's step token budget;
- checkpoint.py: safetensors read with pread, one tensor at a time (no memory map);
- layer_pack.py: the streamed layers written once, fused, in the compute dtype, one aligned region each;
- quantized_layers.py: quantized layers in the pack (the bit-plane kernel's tiles), filled and used in place;
- streamer.py: the reader thread and the reusable buffers (O_DIRECT, or buffered reads dropped from the page cache);
- streamed_model.py: the loader, and StreamedLayer, the seam in the model's layer list.

Not built yet: GPUs (pinned host memory and a copy stream), refused with a clear error.
"""

from tessera.offload.plan import WeightMemoryError, WeightPlan, plan_weights, streaming_token_budget
from tessera.offload.streamed_model import StreamedLayer, WeightSource, load_streamed_model
from tessera.offload.streamer import LayerStreamer, WeightStreamError

__all__ = ["LayerStreamer", "StreamedLayer", "WeightMemoryError", "WeightPlan", "WeightStreamError",
           "WeightSource", "load_streamed_model", "plan_weights", "streaming_token_budget"]
