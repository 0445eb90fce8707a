"""Multi-LoRA (vLLM's shape): `LoRARequest`, PEFT adapters in slots, and the Linear method that adds
their products for a whole mixed batch at once."""

from tessera.lora.request import LoRARequest

__all__ = ["LoRARequest"]
