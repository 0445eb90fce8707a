"""Continuous batching (iteration-level scheduling, Flover's "temporal fusion").

Every step is planned afresh: running sequences advance first (one decode token, or the next chunk
of a prompt), then waiting ones are admitted while the token budget, the sequence cap and the KV pool
allow. Prefill chunks and decode tokens share one flat batch; nothing is padded. When the pool runs
dry, the most recently admitted sequence is preempted: its blocks are freed (they stay in the prefix
cache) and it is recomputed later from its tokens so far, which gives the same result.

With LoRA, at most `max_loras` distinct adapters run at once (each needs one of the manager's slots,
tessera.lora.manager): a waiting sequence whose adapter would be one too many waits, and the ones
behind it (the base model, or adapters already running) may go in.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from tessera.engine.block_manager import BlockManager
from tessera.engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence's tokens, so it yields a next token
        (unless none is to be generated: max_tokens=0 only scores the prompt)."""
        seq = self.seq
        return seq.num_computed_tokens + self.num_new_tokens == seq.num_tokens and seq.params.max_tokens != 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


ADMIT, SKIP, STOP = 0, 1, 2  # an admission policy's verdict on one waiting sequence


class AdmissionPolicy:
    """Which waiting sequences go in, and when. This default is FCFS: the head of the queue is
    admitted while its next chunk fits in the pool, and nothing overtakes it. Offline batches swap in
    `tessera.engine.prefix_planner.PlannedAdmission` (the queue then holds the plan's order)."""

    def start_step(self, scheduler: Scheduler) -> None:
        """Called after the running sequences were given their tokens, before admissions: once per
        pass, so a step planned in two passes (prefill_first) calls it twice; `scheduler.num_steps`
        tells the steps apart."""

    def verdict(self, seq: Sequence) -> int:
        """ADMIT: try seq now; SKIP: leave it waiting and look behind it; STOP: admit nothing more."""
        return ADMIT

    def fits(self, bm: BlockManager, seq: Sequence, num_new_tokens: int) -> bool:
        """May seq (its cached prefix already attached) take its next num_new_tokens now?"""
        return bm.can_allocate(seq, num_new_tokens)

    def admitted(self, seq: Sequence) -> None:
        """seq got its blocks for this step."""


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: AdmissionPolicy | None = None, max_loras: int = 0,
                 mixed_prefill_tokens: int | None = None, prefill_first: bool = False):
        """mixed_prefill_tokens: the most prompt tokens a step that carries running decodes may
        compute (None: up to max_num_batched_tokens). Every decode waits for the whole step, so this
        bounds the gap between a running sequence's tokens when prompts keep arriving.

        prefill_first: a step that can compute prompt tokens computes only those, and the running
        decodes take the next step, alone (vLLM V0's order without chunked prefill, except that decodes
        never wait two steps in a row): a prompt's first token then waits for its prefill, not for every
        running decode beside it, and decode-only steps keep the fused decode path."""
        self.bm = block_manager
        self.max_loras = max_loras  # distinct LoRA adapters running at once (0: LoRA off)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.mixed_prefill_tokens = mixed_prefill_tokens
        self.prefill_first = prefill_first
        self._decodes_waited = False  # prefill_first: the last step left the running decodes out
        self.policy = policy or AdmissionPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.total_preemptions = 0
        self.num_steps = 0  # schedule() calls so far

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def adopt(self, seq: Sequence) -> None:
        """A sequence taken over from another engine, its K/V (if any) already in its blocks: it runs
        from the next step when there is room, else waits at the head of the queue."""
        if seq.block_table and len(self.running) < self.max_num_seqs:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        else:  # a waiting sequence that keeps blocks is admitted with them (or, if it no longer fits, recomputed)
            seq.status = SeqStatus.WAITING
            self.waiting.appendleft(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        if self.prefill_first:
            if self._decodes_waited:  # they waited one prefill step: theirs now, whatever is queued
                self._decodes_waited = False
                out = self._schedule(prompts=False)
                if out.scheduled or out.num_preempted:
                    return out
            if self.waiting or any(s.num_tokens_to_schedule > 1 for s in self.running):
                out = self._schedule(decodes=False)
                if out.scheduled or out.num_preempted:
                    self._decodes_waited = any(s.num_tokens_to_schedule == 1 for s in self.running)
                    return out
        return self._schedule()

    def _schedule(self, decodes: bool = True, prompts: bool = True) -> SchedulerOutput:
        """One step: running sequences first (their next chunk or token), then admissions from the
        queue. decodes=False leaves the running sequences' single tokens for the next step; prompts=False
        leaves prompt chunks and the queue."""
        budget = self.max_num_batched_tokens
        prefill_budget = self._prefill_budget(decodes)
        scheduled: list[ScheduledSeq] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens_to_schedule, budget)
            if (n == 1 and not decodes) or (n > 1 and not prompts):
                i += 1
                continue
            if n > 1:  # a prompt chunk
                n = min(n, prefill_budget)
                if n == 0:  # the step's prompt tokens are spent: the chunk waits for the next step
                    i += 1
                    continue
            while not self.bm.can_allocate(seq, n):
                victim = self.running.pop()  # the newest; never one already scheduled this step
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq, n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                if n > 1:
                    prefill_budget -= n
                i += 1
        # Admit only when nothing was preempted: a pool that just ran dry would preempt again.
        policy = self.policy
        policy.start_step(self)
        k = 0  # the queue position looked at; the policy may skip sequences it wants to hold back
        adapters = {s.lora_int_id for s in self.running if s.lora_int_id}
        while (prompts and k < len(self.waiting) and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[k]
            verdict = policy.verdict(seq)
            if verdict == SKIP:
                k += 1
                continue
            if verdict == STOP:
                break
            lora = seq.lora_int_id
            if lora and lora not in adapters and len(adapters) >= self.max_loras:
                k += 1  # its adapter would need a slot none of the running adapters can give up
                continue
            if not seq.block_table:
                self.bm.match_prefix(seq)
            n = min(seq.num_tokens_to_schedule, budget)
            if n > 1:
                n = min(n, prefill_budget)
                if n == 0:
                    break
                prefill_budget -= n
            if not policy.fits(self.bm, seq, n):
                if not self.running:
                    log.debug("pool too small to admit %s right now", seq.request_id)
                self.bm.free_seq(seq)  # give the prefix-cache references back until it fits
                break
            del self.waiting[k]
            self.bm.allocate(seq, n)
            self.bm.count_admission(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            if lora:
                adapters.add(lora)
            policy.admitted(seq)
        self.total_preemptions += preempted
        return SchedulerOutput(scheduled, preempted)

    def _prefill_budget(self, decodes: bool) -> int:
        """Prompt tokens this step may compute: mixed_prefill_tokens when a running sequence decodes
        in it, else the whole step budget (a prefill_first step that leaves the decodes out included)."""
        cap = self.mixed_prefill_tokens
        if cap is None or not decodes or not any(s.num_tokens_to_schedule == 1 for s in self.running):
            return self.max_num_batched_tokens
        return cap

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq at once: its blocks go back to the pool (cached blocks stay findable)."""
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free_seq(seq)
        seq.guided = None  # its grammar matcher (structured output) is no longer needed
