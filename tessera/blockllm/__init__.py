"""BlockLLM: several full fine-tunes of one architecture on one engine, every distinct block stored once
and run once per step for the rows that use it (`LLM(models={"a": path, "b": path})`,
`tessera serve --models a=path,b=path`). docs/architecture.md says why a block is a module (a linear,
a norm, the embeddings)."""

from tessera.blockllm.store import Variant, VariantSet, load_variants, parse_models

__all__ = ["Variant", "VariantSet", "load_variants", "parse_models"]
