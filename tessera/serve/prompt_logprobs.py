"""Prompt logprobs on the server, as vLLM serves them.

- `prompt_logprobs: N` (vLLM's extra field, completions and chat) returns each prompt token's logprob
  plus the top-N there: choice-level on completions, response-level on chat, in vLLM's shape (None for
  the first token, then {token_id: {logprob, rank, decoded_token}}); -inf clamped to -9999.0 as vLLM
  does. Not with stream=true (vLLM refuses that too).
- Completions `echo=true` with `logprobs: N` puts the prompt tokens' logprobs (top-N too) in front of
  the generated ones, the first token's null: what lm-evaluation-harness's `local-completions` sends
  for loglikelihood. `max_tokens: 0` with echo (or prompt_logprobs) scores the prompt and generates
  nothing (OpenAI's and vLLM's "echo without generation").
"""

from __future__ import annotations

import math

from tessera.outputs import Logprob
from tessera.serve.errors import APIError
from tessera.serve.protocol import PromptLogprob, PromptLogprobs


def check_prompt_logprobs(req) -> None:
    """What a completions or chat request may ask for (the range is SamplingParams')."""
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs are not available with stream=true", param="prompt_logprobs")


def completion_prompt_logprobs(req) -> int | None:
    """SamplingParams.prompt_logprobs for a completions request: its own, else the echo's `logprobs`;
    an echo without generation and without logprobs still needs the engine to run the prompt (0)."""
    if req.prompt_logprobs is not None:
        return req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        return req.logprobs
    if req.echo and req.max_tokens == 0:
        return 0
    return None


def completion_choice_prompt_logprobs(req, out) -> PromptLogprobs | None:
    """A completions choice's `prompt_logprobs` (`out` its RequestOutput): whenever they were asked for,
    directly or through echo + logprobs, as vLLM; not those an echo without generation only ran for."""
    if req.prompt_logprobs is None and not (req.echo and req.logprobs is not None):
        return None
    return vllm_prompt_logprobs(out.prompt_logprobs)


def check_zero_max_tokens(req) -> None:
    """max_tokens=0 generates nothing: only an echo or prompt_logprobs make it a request at all."""
    if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
        raise APIError(400, "max_tokens must be >= 1, or 0 together with echo=true or prompt_logprobs (to only "
                       "score the prompt)", param="max_tokens")


def vllm_prompt_logprobs(entries: list[dict[int, Logprob] | None] | None) -> PromptLogprobs | None:
    if entries is None:
        return None
    return [
        None if entry is None else {
            t: PromptLogprob(logprob=lp.logprob if math.isfinite(lp.logprob) else -9999.0, rank=lp.rank,
                             decoded_token=lp.decoded_token)
            for t, lp in entry.items()
        }
        for entry in entries
    ]


def echo_logprobs(echo: bool, prompt_ids: list[int], out, token_ids: list[int], entries: list) -> tuple[list, list]:
    """The tokens and logprob entries a completions choice reports: with echo, the prompt's go first
    (`out` a RequestOutput with prompt_logprobs; the first prompt token's entry is None)."""
    if not echo or out.prompt_logprobs is None:
        return token_ids, entries
    return [*prompt_ids, *token_ids], [*out.prompt_logprobs, *entries]
