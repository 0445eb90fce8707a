"""tessera's exception types. Every user-facing failure raises one of these, naming the problem."""


class TesseraError(Exception):
    """Base class of every error tessera raises on purpose."""


class ModelLoadError(TesseraError):
    """The model path is missing, unreadable, or its files are corrupt."""


class AdapterNotFoundError(ModelLoadError):
    """A LoRA adapter's directory or one of its files is not there (or no longer there)."""


class UnsupportedModelError(TesseraError):
    """The checkpoint's architecture, quantization type or option is not supported."""


class InvalidRequestError(TesseraError, ValueError):
    """A prompt or a sampling parameter is invalid (empty prompt, bad token id, bad parameter...)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_tokens where that matters) does not fit the model's context."""

    def __init__(self, prompt_len: int, max_model_len: int, message: str | None = None):
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len
        super().__init__(
            message
            or f"prompt has {prompt_len} tokens but the context length (max_model_len) is {max_model_len}"
        )


class OutOfKVCacheError(TesseraError):
    """The KV cache is too small to hold even one request of this length."""


class DistributedError(TesseraError):
    """A rank of a tensor- or sequence-parallel engine died, timed out, or could not start; the engine is
    shut down (every other rank exits)."""
