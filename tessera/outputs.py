"""What `LLM.generate` returns: one RequestOutput per prompt, vLLM-shaped."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    rank: int  # 1 + the number of tokens the model found more likely
    decoded_token: str | None = None  # the token's text (prompt logprobs; vLLM's field)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    error: str | None = None
    # With `error`: the request's own fault, when it is one (a tessera.errors.TesseraError, e.g. an
    # AdapterNotFoundError for a LoRA adapter whose files are gone); None: the engine failed it.
    error_cause: Exception | None = None
    metrics: dict = field(default_factory=dict)
    prompt_entropies: list[float] | None = None  # with SamplingParams.prompt_entropies (first sequence's)
    # With SamplingParams.prompt_logprobs, vLLM's shape: None for the first prompt token (nothing
    # predicts it), then per prompt token {token_id: Logprob} holding that token plus the top-N.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    # The first completion's fields, so that `out.text` works as the DESIGN contract says.
    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else "error"
