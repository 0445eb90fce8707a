"""tessera: a small, exact, fast LLM inference engine with vLLM-shaped APIs."""

from tessera.errors import (
    InvalidRequestError,
    ModelLoadError,
    OutOfKVCacheError,
    PromptTooLongError,
    TesseraError,
    UnsupportedModelError,
)
from tessera.guided_params import GuidedDecodingParams
from tessera.llm import LLM
from tessera.lora import LoRARequest
from tessera.outputs import CompletionOutput, RequestOutput
from tessera.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "GuidedDecodingParams", "RequestOutput", "CompletionOutput",
           "TesseraError", "ModelLoadError",
           "UnsupportedModelError", "InvalidRequestError", "PromptTooLongError", "OutOfKVCacheError"]
