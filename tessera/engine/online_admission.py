"""How a server admits prompts when their prefill is capped: shortest first, with aging.

On a server given `mixed_prefill_tokens` (off by default), a step that carries decodes computes at
most that many prompt tokens (tessera/engine/scheduler.py), so arriving prompts can queue for the
prefill budget. Taking the shortest first lets a short prompt's first token out in the next step
instead of behind a long prompt's chunks; the long prompt is delayed by about the short one's own
prefill. So that a long prompt never waits forever behind a stream of short ones, its length counts
`aging_tokens` less for every step it has waited. Preempted sequences (recomputed from their
tokens) go first, as in FCFS.

The order only changes which prompts run first, never what they compute: results are unchanged.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from tessera.engine.scheduler import AdmissionPolicy
from tessera.engine.sequence import Sequence

if TYPE_CHECKING:
    from tessera.engine.scheduler import Scheduler


class ShortestPromptFirst(AdmissionPolicy):
    def __init__(self, aging_tokens: int = 128):
        self.aging_tokens = aging_tokens
        self.step = 0
        self.first_seen: WeakKeyDictionary[Sequence, int] = WeakKeyDictionary()  # step it was first queued

    def _key(self, seq: Sequence) -> tuple[bool, int]:
        waited = self.step - self.first_seen.setdefault(seq, self.step)
        return seq.num_preemptions == 0, seq.num_tokens_to_schedule - self.aging_tokens * waited

    def start_step(self, scheduler: Scheduler) -> None:
        self.step = scheduler.num_steps  # not a count of calls: a step planned in two passes calls twice
        if len(scheduler.waiting) > 1:
            scheduler.waiting = deque(sorted(scheduler.waiting, key=self._key))  # stable: ties stay FCFS
