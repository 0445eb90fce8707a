"""logit_bias, allowed_token_ids and bad_words: per-request edits of the logits before sampling, with
vLLM's (and OpenAI's) semantics. Kept apart from the penalties (sampler.apply_penalties) and from
structured output's grammar mask: these are fixed lists the request gives, not state.

Each request's lists become tensors once, when it is added (`TokenConstraints.build`); each step then
gathers the rows that have any into one index_put per kind, so the cost is the lists' length, never a
Python loop over the vocabulary. Rows without constraints are not touched: their logits (and so greedy
outputs) stay bit for bit what they were."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.errors import InvalidRequestError
from tessera.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenConstraints:
    """One request's constraints as token ids (shared by its sequences)."""

    bias_ids: torch.Tensor | None = None  # [k] long
    bias_values: torch.Tensor | None = None  # [k] float32
    allowed_ids: torch.Tensor | None = None  # [m] long
    bad_words: list[list[int]] = field(default_factory=list)  # token sequences, vLLM's bad-words shape

    @classmethod
    def build(cls, params: SamplingParams, tokenizer, vocab_size: int) -> TokenConstraints | None:
        """None when the request has none. Token ids outside [0, vocab_size) are an InvalidRequestError."""
        if not params.needs_token_constraints:
            return None
        bias_ids = bias_values = allowed = None
        if params.logit_bias:
            _check_ids("logit_bias", params.logit_bias, vocab_size)
            bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            bias_values = torch.tensor([float(v) for v in params.logit_bias.values()], dtype=torch.float32)
        if params.allowed_token_ids:
            _check_ids("allowed_token_ids", params.allowed_token_ids, vocab_size)
            allowed = torch.tensor(sorted(set(params.allowed_token_ids)), dtype=torch.long)
        words = []
        if params.bad_words:
            if tokenizer is None:
                raise InvalidRequestError("invalid sampling parameter: bad_words needs a tokenizer; the model has none")
            words = bad_words_token_ids(tokenizer, params.bad_words)
        return cls(bias_ids, bias_values, allowed, words)


def _check_ids(name: str, ids, vocab_size: int) -> None:
    bad = sorted(t for t in ids if not 0 <= t < vocab_size)
    if bad:
        raise InvalidRequestError(
            f"invalid sampling parameter: {name} token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's tokenization of bad_words: each word as it reads at the start of a text and, where that
    is a different token sequence of the same length, after a space (mid-text)."""
    out: list[list[int]] = []
    for word in words:
        for prefix in ("", " "):
            ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                continue
            if not prefix or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out


def banned_by_bad_words(seq) -> list[int]:
    """The last token of every bad word whose other tokens the output so far ends with (one-token
    words: always). Only output tokens count, as in vLLM: a prompt ending in a prefix bans nothing."""
    banned = []
    toks, n_out = seq.token_ids, seq.num_output_tokens
    for ids in seq.constraints.bad_words:
        k = len(ids) - 1
        if k == 0 or (n_out >= k and toks[-k:] == ids[:-1]):
            banned.append(ids[-1])
    return banned


def apply_token_constraints(logits: torch.Tensor, seqs: list) -> None:
    """In place, on rows whose sequence has constraints: logit_bias added, every token outside
    allowed_token_ids and every banned bad-word token set to -inf."""
    dev = logits.device
    bias_rows, bias_ids, bias_vals = [], [], []
    keep_rows, keep_ids = [], []
    ban_rows, ban_ids = [], []
    for row, seq in enumerate(seqs):
        c = seq.constraints
        if c is None:
            continue
        if c.bias_ids is not None:
            bias_rows.append(torch.full_like(c.bias_ids, row))
            bias_ids.append(c.bias_ids)
            bias_vals.append(c.bias_values)
        if c.allowed_ids is not None:
            keep_rows.append(torch.full_like(c.allowed_ids, row))
            keep_ids.append(c.allowed_ids)
        if c.bad_words:
            banned = banned_by_bad_words(seq)
            ban_rows += [row] * len(banned)
            ban_ids += banned
    if bias_rows:
        idx = (torch.cat(bias_rows).to(dev), torch.cat(bias_ids).to(dev))
        logits.index_put_(idx, torch.cat(bias_vals).to(dev, logits.dtype), accumulate=True)
    if keep_rows:
        rows = torch.cat(keep_rows)
        mask = torch.zeros_like(logits, dtype=torch.bool)  # True: may not be sampled
        mask[rows.unique().to(dev)] = True
        mask[rows.to(dev), torch.cat(keep_ids).to(dev)] = False
        logits.masked_fill_(mask, float("-inf"))
    if ban_rows:
        logits[torch.tensor(ban_rows, device=dev), torch.tensor(ban_ids, device=dev)] = float("-inf")
