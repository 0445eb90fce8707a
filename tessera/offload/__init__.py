"""Models larger than memory: a resident weight budget (`weight_memory`), the rest streamed from disk.

- plan.py: which layers stay resident (evenly spread, so reading never idles), the budget check, and
  the throughput mode's step token budget;
- checkpoint.py: safetensors read with pread, one tensor at a time (no memory map);
- layer_pack.py: the streamed layers written once, fused, in the compute dtype, one aligned region each;
- quantized_layers.py: quantized layers in the pack (the bit-plane kernel's tiles), filled and used in place;
- streamer.py: the reader thread and the reusable buffers (O_DIRECT, or buffered reads dropped from the page cache);
- ring_schedule.py: on a GPU, the order of copies, computes and events through a ring of device buffers;
- device_streamer.py: on a GPU, the streamed layers in pinned host memory, copied into that ring on a copy stream;
- heap.py: freed heap pages handed back to the OS at each layer boundary while loading;
- streamed_model.py: the loader, and StreamedLayer, the seam in the model's layer list.

On a GPU only dense weights stream so far (quantized ones are refused with a clear error), and the GPU
path has not been measured (no GPU was lent when it was written).
"""

from tessera.offload.device_streamer import DeviceLayerStreamer
from tessera.offload.plan import WeightMemoryError, WeightPlan, plan_weights, streaming_token_budget
from tessera.offload.streamed_model import StreamedLayer, WeightSource, load_streamed_model
from tessera.offload.streamer import LayerStreamer, WeightStreamError

__all__ = ["DeviceLayerStreamer", "LayerStreamer", "StreamedLayer", "WeightMemoryError", "WeightPlan",
           "WeightStreamError", "WeightSource", "load_streamed_model", "plan_weights", "streaming_token_budget"]
