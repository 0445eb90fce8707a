"""Turns logits into next tokens: penalties, temperature, top-k / top-p / min-p, seeded sampling,
top-N logprobs. Rows that need none of this cost one argmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.engine.guided import apply_grammar_mask
from tessera.engine.logprobs import logprob_entries
from tessera.engine.sequence import Sequence
from tessera.engine.token_constraints import apply_token_constraints
from tessera.outputs import Logprob


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row, when the request asked for logprobs
    token_logprobs: list[float | None]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty (HF: over prompt and output), presence/frequency (OpenAI: output)."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_penalties:
            continue
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device).unique()
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                              min_p: torch.Tensor) -> torch.Tensor:
    """Returns logits with every excluded token at -inf. top_k: [B] (vocab = off), top_p, min_p: [B].

    In HF's and vLLM's order: top-k first (ties with the k-th logit stay), then top-p over the top-k
    distribution renormalised (drop the tokens whose cumulative mass from the least likely up is at
    most 1 - top_p), then min-p relative to the most likely token. The most likely token always stays."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending, as HF and vLLM compute it
    vocab = logits.shape[-1]
    kth = sorted_logits.gather(-1, (vocab - top_k).clamp(0, vocab - 1)[:, None].long())
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) <= (1 - top_p)[:, None]
    drop |= probs < min_p[:, None] * probs[:, -1:]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        logits = logits.float()
        # best_of ranks its sequences by cumulative logprob, so it needs the chosen tokens' logprobs.
        want_logprobs = [s.params.logprobs is not None or s.params.num_sequences > s.params.n for s in seqs]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
        if any(s.params.needs_penalties for s in seqs):
            logits = logits.clone()
            apply_penalties(logits, seqs)
        if any(s.constraints is not None for s in seqs):
            apply_token_constraints(logits, seqs)
        self._block_early_stop(logits, seqs)
        if any(s.guided is not None for s in seqs):
            apply_grammar_mask(logits, seqs)  # in place: logits is the runner's fresh fp32 output or a copy
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        every_row = len(random_rows) == len(seqs)
        # A pass over the vocabulary costs ~1 ms per 64 rows on a CPU: make no pass that is not needed.
        tokens = None if every_row else logits.argmax(dim=-1)
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in random_rows], device=logits.device)
            rows = logits if every_row else logits[idx]
            random_seqs = [seqs[i] for i in random_rows]
            params = [s.params for s in random_seqs]
            filtered = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params)
            kernels = None if filtered else _cpu_sampling_kernels(rows)
            if kernels is not None:
                # One C++ task per row, the same numbers as the path below (ops/csrc/sampling.cpp)
                drawn = torch.empty(len(random_rows), dtype=torch.long)
                kernels.sample_rows(drawn, rows, temps.float(), self._uniforms(random_seqs).view(-1))
            else:
                sub = rows / temps[:, None]
                if filtered:
                    vocab = sub.shape[-1]
                    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params],
                                         device=sub.device)
                    top_p = torch.tensor([p.top_p for p in params], device=sub.device)
                    min_p = torch.tensor([p.min_p for p in params], device=sub.device)
                    sub = _filter_top_k_top_p_min_p(sub, top_k, top_p, min_p)
                # Unnormalised: _draw scales its uniform numbers by each row's total instead.
                weights = (sub - sub.amax(dim=-1, keepdim=True)).exp_()
                drawn = self._draw(weights, random_seqs)
            if every_row:
                tokens = drawn
            else:
                tokens[idx] = drawn
        token_list = tokens.tolist()
        lps: list[dict[int, Logprob] | None] = [None] * len(seqs)
        tok_lp: list[float | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, s in enumerate(seqs):
                if not want_logprobs[i]:
                    continue
                row = raw_logprobs[i]
                chosen = token_list[i]
                tok_lp[i] = float(row[chosen])
                if s.params.logprobs is None:  # best_of only: the cumulative logprob, no entries
                    continue
                lps[i] = logprob_entries(row[None], [chosen], [s.params.logprobs])[0]
        return SampleResult(token_list, lps, tok_lp)

    def _draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Inverse-CDF sampling: one uniform number per row against the row's cumulative probabilities
        (`probs` may be unnormalised: the number is scaled by the row's total).
        A seeded sequence draws its number from its own generator, so its output does not depend on
        what else shares the batch. Tokens of zero probability can never be chosen. The numbers are
        drawn on the CPU (the generators live there), so a seed gives the same draws on every device."""
        uniform = self._uniforms(seqs).to(probs.device)
        cdf = probs.cumsum(dim=-1)
        picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
        # Rounding can land u on the very end of the CDF: fall back to the most likely token there.
        # (Unconditionally: asking whether any row needs it would wait for the device.)
        ok = probs.gather(-1, picked) > 0
        return torch.where(ok, picked, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One uniform number per sequence, [len(seqs), 1] on the CPU: a seeded sequence's from its own
        generator, so its output does not depend on what else shares the batch."""
        uniform = torch.empty(len(seqs), 1)
        if all(s.generator is None for s in seqs):
            uniform.uniform_(generator=self.generator)
        else:
            for i, s in enumerate(seqs):
                uniform[i].uniform_(generator=s.generator if s.generator is not None else self.generator)
        return uniform

    @staticmethod
    def _block_early_stop(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: EOS and stop tokens cannot be chosen before the request's minimum length."""
        for row, s in enumerate(seqs):
            if s.params.min_tokens and s.num_output_tokens < s.params.min_tokens:
                banned = list(s.stop_token_set)
                if banned:
                    logits[row, banned] = float("-inf")


def _cpu_sampling_kernels(logits: torch.Tensor):
    """tessera's CPU kernels when `logits` (fp32, unit column stride) can go to their sample_rows, else None
    (another device, or no compiler: the torch path)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        return None
    from tessera.ops.cpu_kernels import cpu_kernels

    return cpu_kernels()
