"""EngineFront: what the HTTP layer asks of an engine (tokenizer, context length, generation defaults,
request checks, grammars), for a router whose engines live in other processes. It loads the model's
config and tokenizer, never its weights, and checks requests with LLMEngine's own methods, so a fleet
refuses exactly what one engine would."""

from __future__ import annotations

from types import SimpleNamespace

from tessera.config import EngineConfig, ModelConfig
from tessera.engine.guided import GrammarCache
from tessera.engine.llm_engine import LLMEngine
from tessera.generation_config import load_generation_defaults
from tessera.models.loader import resolve_model_path
from tessera.tokenizer import load_tokenizer


class EngineFront:
    encode_prompt = LLMEngine.encode_prompt
    check_request = LLMEngine.check_request
    eos_token_ids = LLMEngine.eos_token_ids
    _resolve_max_model_len = LLMEngine._resolve_max_model_len

    def __init__(self, config: EngineConfig, num_blocks: int):
        """num_blocks: one instance's KV pool (a request must fit in one)."""
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_dir(self.model_path)
        self.max_model_len = self._resolve_max_model_len()
        self.tokenizer = load_tokenizer(self.model_path)
        self.generation_defaults = load_generation_defaults(self.model_path, config.generation_config)
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.block_manager = SimpleNamespace(num_blocks=num_blocks)
        self.block_size = config.block_size
        self.lora = None  # a fleet serves the base model only
        self.variants = None  # and one model (no --models block sharing)
