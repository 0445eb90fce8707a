"""LoRARequest: which adapter a request runs with (vLLM's shape: name, integer id, path)."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from tessera.errors import InvalidRequestError


@dataclass(frozen=True)
class LoRARequest:
    """`LoRARequest("sql", 1, "/path/to/adapter")`: a PEFT LoRA directory (adapter_config.json +
    adapter_model.safetensors). `lora_int_id` (> 0) identifies the adapter to the engine, as in vLLM:
    two requests with the same id share the adapter's slot; the id, name and path together key the
    prefix cache, so KV computed with one adapter is never reused by another."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidRequestError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id <= 0:
            raise InvalidRequestError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidRequestError(f"LoRA {self.lora_name!r}: lora_path must name the adapter's directory")

    @property
    def cache_salt(self) -> int:
        """Seeds the prefix cache's hash chain (tessera.engine.block_manager): blocks computed under
        this adapter hash apart from the base model's and every other adapter's."""
        key = f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode()
        return xxhash.xxh3_64_intdigest(key)
