"""Routing policies for a fleet of engine instances, as pure decisions on snapshots of their state.

Nothing here touches an engine, a model or Ray: the real router (tessera/fleet, Ray actors) and the
discrete-event simulator (tessera/fleet/sim.py) both take a snapshot of every instance
(`InstanceState`), ask the policy, and carry out what it returns. So the same code decides in both, and
each decision can be unit-tested on hand-made snapshots.

The five policies (`--routing` names):

- `round-robin`: the next live instance in turn.
- `least-loaded`: the live instance with the fewest sequences (running + waiting), then the least KV.
- `prefix`: the instance whose prefix cache holds the longest prefix of the prompt (SGLang's
  cache-aware routing), unless it is busier than the least-loaded one by more than `balance_slack`.
- `pd-split`: a static prefill/decode split (Splitwise, DistServe): prefill instances run prompts, and
  once a prompt's KV is complete it moves to the least-loaded decode instance, which decodes it.
- `accellm`: instances in pairs (AcceLLM, Bournias et al. 2024). The pair member that prefills keeps its
  KV and streams a copy to its partner as it is produced, so either member can decode any of the pair's
  requests without a transfer; the member that takes the pair's prompts is chosen by load (roles
  switch), decodes move within the pair to balance it and to keep them away from a member that is
  prefilling, redundant copies are the first thing dropped under memory pressure, and when a member
  dies its partner resumes its requests from its own copies.

A policy may keep state between calls (a round-robin cursor); every input it needs comes in the
snapshot, so a router owns one policy object and calls it from one thread.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tessera.errors import InvalidRequestError

# How often a router asks `rebalance` for in-pair moves, and how long a moved request then stays put (the
# snapshots a move is decided on may not show the last one yet): the real router's and the simulator's.
REBALANCE_EVERY = 0.05
MOVE_COOLDOWN = 1.0


class Role(enum.StrEnum):
    MIXED = "mixed"  # colocated: prefills and decodes (every policy but pd-split)
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class RequestInfo:
    """What a router knows of a request when it places it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class InstanceState:
    """A snapshot of one engine instance, as the router sees it."""

    instance_id: int
    role: Role = Role.MIXED
    pair_id: int | None = None  # accellm: the pair it belongs to
    alive: bool = True
    num_running: int = 0  # sequences in the scheduler's running list
    num_waiting: int = 0  # sequences queued for admission
    num_prefilling: int = 0  # of running + waiting, those whose prompt is not computed yet
    prefill_tokens: int = 0  # prompt tokens those still have to compute (0 where the snapshot does not say)
    free_blocks: int = 0
    used_blocks: int = 0
    redundant_blocks: int = 0  # accellm: of used_blocks, those held only as copies of the partner's
    block_size: int = 16
    # How many leading tokens of a prompt this instance's prefix cache holds (None: unknown, 0).
    prefix_match: Callable[[Sequence[int]], int] | None = field(default=None, compare=False, repr=False)

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting

    @property
    def num_decoding(self) -> int:
        return max(0, self.load - self.num_prefilling)

    @property
    def kv_fraction(self) -> float:
        total = self.free_blocks + self.used_blocks
        return self.used_blocks / total if total else 0.0

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        return self.prefix_match(token_ids) if self.prefix_match is not None else 0


@dataclass(frozen=True)
class Placement:
    """Where a new request goes: `prefill` runs its prompt; `replicate_to` (accellm) receives a copy of
    its KV as it is produced (layer by layer, then each new token's rows), so that instance can decode it."""

    prefill: int
    replicate_to: int | None = None


@dataclass(frozen=True)
class Handoff:
    """Who decodes a request once its prompt is done. `move_kv`: its KV must be sent to `decode` first
    (pd-split); `keep_copy`: the prefill instance keeps its copy (accellm: the partner's is the spare)."""

    decode: int
    move_kv: bool = False
    keep_copy: bool = False


@dataclass(frozen=True)
class Move:
    """Move `count` decoding requests from `src` to `dst` (accellm, within a pair: both hold their KV, so
    nothing is transferred; only requests whose copy on dst is whole may move). `while_prefilling`: the
    move is for getting decodes out of src's prefill; src checks, when it carries the move out, that it
    still has prompt work (the snapshot the move was decided on is a poll old) and otherwise keeps them."""

    src: int
    dst: int
    count: int
    while_prefilling: bool = False


@dataclass(frozen=True)
class CopyInfo:
    """One request's KV on an instance (accellm), for choosing what to drop under memory pressure."""

    request_id: str
    num_blocks: int
    redundant: bool  # the partner decodes it and holds the other copy
    last_step: int = 0  # when it was last decoded here (older is dropped first)


@dataclass(frozen=True)
class Recovery:
    """Where a dead instance's request continues: `from_copy` resumes decoding from the KV copy already
    on `instance`; otherwise the request is run again there from its prompt."""

    instance: int
    from_copy: bool = False


def _alive(instances: Sequence[InstanceState]) -> list[InstanceState]:
    live = [s for s in instances if s.alive]
    if not live:
        raise InvalidRequestError("no live instance to route to")
    return live


def least_loaded(instances: Sequence[InstanceState]) -> InstanceState:
    """Fewest sequences, then least KV in use, then the lowest id (deterministic)."""
    return min(_alive(instances), key=lambda s: (s.load, s.kv_fraction, s.instance_id))


class RoutingPolicy:
    """The colocated default: a request prefills and decodes on the instance `route` picks."""

    name = "base"
    uses_pairs = False

    def roles(self, num_instances: int) -> list[Role]:
        return [Role.MIXED] * num_instances

    def route(self, request: RequestInfo, instances: Sequence[InstanceState]) -> Placement:
        raise NotImplementedError

    def after_prefill(self, request: RequestInfo, prefill: int, instances: Sequence[InstanceState],
                      has_copy: Callable[[int], bool] = lambda i: False) -> Handoff:
        """Called when request's prompt is computed on `prefill` (has_copy(i): instance i holds a whole
        copy of its KV)."""
        return Handoff(decode=prefill)

    def rebalance(self, instances: Sequence[InstanceState]) -> list[Move]:
        """Called between steps; moves of decoding requests (none unless KV is already where they go)."""
        return []

    def copies_to_drop(self, copies: Sequence[CopyInfo], blocks_needed: int) -> list[str]:
        """Which copies an instance short of `blocks_needed` blocks drops: only redundant ones (a
        request's only copy is never dropped here; the scheduler preempts instead), oldest first."""
        out, freed = [], 0
        for c in sorted((c for c in copies if c.redundant), key=lambda c: (c.last_step, c.request_id)):
            if freed >= blocks_needed:
                break
            out.append(c.request_id)
            freed += c.num_blocks
        return out

    def on_death(self, dead: int, requests: Sequence[RequestInfo], instances: Sequence[InstanceState],
                 has_copy: Callable[[str, int], bool] = lambda r, i: False) -> dict[str, Recovery]:
        """Where each of the dead instance's unfinished requests continues. Default: run it again from its
        prompt where `route` would put it now (the dead instance excluded)."""
        live = [s for s in instances if s.alive and s.instance_id != dead]
        out: dict[str, Recovery] = {}
        for req in requests:
            out[req.request_id] = Recovery(self.route(req, live).prefill)
        return out


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RequestInfo, instances: Sequence[InstanceState]) -> Placement:
        live = sorted(_alive(instances), key=lambda s: s.instance_id)
        # The first live id at or after the cursor, so a dead instance's turn passes to the next one.
        pick = next((s for s in live if s.instance_id >= self._next), live[0])
        self._next = pick.instance_id + 1
        return Placement(pick.instance_id)


class LeastLoaded(RoutingPolicy):
    name = "least-loaded"

    def route(self, request: RequestInfo, instances: Sequence[InstanceState]) -> Placement:
        return Placement(least_loaded(instances).instance_id)


class PrefixAware(RoutingPolicy):
    """Longest cached prefix wins (at least `min_match_tokens`), unless that instance has more than
    `balance_slack` sequences above the least-loaded one: then load wins, so a hot prefix cannot pile
    every request onto one instance."""

    name = "prefix"

    def __init__(self, min_match_tokens: int = 16, balance_slack: int = 8) -> None:
        self.min_match_tokens = min_match_tokens
        self.balance_slack = balance_slack

    def route(self, request: RequestInfo, instances: Sequence[InstanceState]) -> Placement:
        live = _alive(instances)
        idle = least_loaded(live)
        best, best_len = idle, 0
        for s in sorted(live, key=lambda s: (s.load, s.instance_id)):
            n = s.cached_prefix_tokens(request.prompt_token_ids)
            if n > best_len:
                best, best_len = s, n
        if best_len < self.min_match_tokens or best.load > idle.load + self.balance_slack:
            return Placement(idle.instance_id)
        return Placement(best.instance_id)


def split_roles(num_instances: int, num_prefill: int | None = None) -> list[Role]:
    """The first `num_prefill` instances prefill (default: half, rounded down, at least one), the rest decode."""
    if num_instances < 2:
        raise InvalidRequestError("pd-split needs at least 2 instances (one prefill, one decode)")
    p = max(1, num_instances // 2) if num_prefill is None else num_prefill
    if not 1 <= p < num_instances:
        raise InvalidRequestError(f"pd-split: {p} prefill instances of {num_instances}; need 1..{num_instances - 1}")
    return [Role.PREFILL] * p + [Role.DECODE] * (num_instances - p)


class PDSplit(RoutingPolicy):
    """Static split. A prompt goes to the least-loaded prefill instance; when it is computed, its KV moves
    to the least-loaded decode instance. If every instance of a role is dead, the other role's
    instances take its work (colocated), so no request waits forever."""

    name = "pd-split"

    def __init__(self, num_prefill: int | None = None) -> None:
        self.num_prefill = num_prefill

    def roles(self, num_instances: int) -> list[Role]:
        return split_roles(num_instances, self.num_prefill)

    @staticmethod
    def _of_role(instances: Sequence[InstanceState], role: Role) -> list[InstanceState]:
        live = _alive(instances)
        return [s for s in live if s.role == role] or live

    def route(self, request: RequestInfo, instances: Sequence[InstanceState]) -> Placement:
        return Placement(least_loaded(self._of_role(instances, Role.PREFILL)).instance_id)

    def after_prefill(self, request, prefill, instances, has_copy=lambda i: False) -> Handoff:
        dst = least_loaded(self._of_role(instances, Role.DECODE)).instance_id
        return Handoff(decode=dst, move_kv=dst != prefill)


def pair_of(instance_id: int) -> int:
    """accellm pairs are consecutive instances: (0, 1), (2, 3), ..."""
    return instance_id // 2


def partner_of(instance_id: int) -> int:
    return instance_id ^ 1


class AcceLLM(RoutingPolicy):
    """Redundant-KV instance pairs.

    - route: the pair with the least load; inside it, the member already prefilling keeps taking the
      pair's prompts (prefills batch together and the partner's decodes are not stalled by them) until
      its prefill backlog exceeds the partner's by more than `prefill_backlog` sequences or
      `prefill_backlog_tokens` prompt tokens (about one step's budget: past that, waiting costs more than
      a decode stalled by a prefill chunk, so both members prefill), and then the member with less prompt
      work left takes it; with no prompt in the pair, the member with fewer decodes. That is the role
      switch. The partner receives the KV copy (`replicate_to`).
    - after_prefill: decode on the partner if it holds a whole copy, the prefill member still has prompts
      to run and the partner has none; otherwise on a member without prompts, the one with fewer decodes
      (both hold the KV).
    - rebalance: within a pair, decodes leave a member that has at least `evict_prefill_tokens` of prompt
      work for its partner if the partner has none; between two members that only decode, the larger
      batch gives half its surplus to the smaller when the surplus is at least `move_threshold` and the
      larger batch at least `balance_ratio` times the smaller. The ratio is hysteresis: after a prefill
      the batches come back into balance once, not back and forth with every arrival (on a 2-instance
      CPU fleet every request moved 8-10 times without it).
    - on_death: the partner resumes every request it holds a copy of; the rest run again elsewhere.
    """

    name = "accellm"
    uses_pairs = True

    def __init__(self, prefill_backlog: int = 4, move_threshold: int = 2, prefill_backlog_tokens: int = 2048,
                 evict_prefill_tokens: int = 1, balance_ratio: float = 1.5) -> None:
        self.prefill_backlog = prefill_backlog
        self.prefill_backlog_tokens = prefill_backlog_tokens
        self.move_threshold = move_threshold
        self.evict_prefill_tokens = evict_prefill_tokens
        self.balance_ratio = balance_ratio

    def roles(self, num_instances: int) -> list[Role]:
        if num_instances < 2 or num_instances % 2:
            raise InvalidRequestError(f"accellm pairs instances: needs an even number >= 2, got {num_instances}")
        return [Role.MIXED] * num_instances

    @staticmethod
    def _pairs(instances: Sequence[InstanceState]) -> dict[int, list[InstanceState]]:
        pairs: dict[int, list[InstanceState]] = {}
        for s in _alive(instances):
            pid = s.pair_id if s.pair_id is not None else pair_of(s.instance_id)
            pairs.setdefault(pid, []).append(s)
        return pairs

    def _prefill_member(self, members: list[InstanceState]) -> InstanceState:
        if len(members) == 1:
            return members[0]
        a, b = sorted(members, key=lambda s: (s.num_prefilling, s.instance_id), reverse=True)
        # a is prefilling more (or equally); keep prompts there unless its backlog is much longer.
        if (a.num_prefilling > 0 and a.num_prefilling - b.num_prefilling <= self.prefill_backlog
                and a.prefill_tokens - b.prefill_tokens <= self.prefill_backlog_tokens):
            return a
        if a.num_prefilling > 0:  # a's backlog is too long: the member with less prompt work left takes it
            return min(members, key=lambda s: (s.prefill_tokens, s.num_prefilling, s.num_decoding, s.instance_id))
        return min(members, key=lambda s: (s.num_decoding, s.kv_fraction, s.instance_id))

    def route(self, request: RequestInfo, instances: Sequence[InstanceState]) -> Placement:
        pairs = self._pairs(instances)
        pid = min(pairs, key=lambda p: (sum(s.load for s in pairs[p]) / len(pairs[p]),
                                        max(s.kv_fraction for s in pairs[p]), p))
        members = pairs[pid]
        pick = self._prefill_member(members)
        other = [s.instance_id for s in members if s is not pick]
        return Placement(pick.instance_id, replicate_to=other[0] if other else None)

    def after_prefill(self, request, prefill, instances, has_copy=lambda i: False) -> Handoff:
        by_id = {s.instance_id: s for s in instances}
        me, partner = by_id.get(prefill), by_id.get(partner_of(prefill))
        if partner is None or not partner.alive or not has_copy(partner.instance_id):
            return Handoff(decode=prefill, keep_copy=False)
        if me is not None and me.num_prefilling > 0:
            # To the partner, unless it prefills too: its next steps would stall the decode just the same.
            return Handoff(decode=prefill if partner.num_prefilling else partner.instance_id, keep_copy=True)
        pick = min((me, partner), key=lambda s: (s.num_prefilling > 0, s.num_decoding, s.instance_id))
        return Handoff(decode=pick.instance_id, keep_copy=True)

    def rebalance(self, instances: Sequence[InstanceState]) -> list[Move]:
        moves = []
        for members in self._pairs(instances).values():
            if len(members) != 2:
                continue
            a, b = members
            for src, dst in ((a, b), (b, a)):
                if (src.num_prefilling and not dst.num_prefilling and src.num_decoding
                        and max(src.prefill_tokens, 1) >= self.evict_prefill_tokens):
                    moves.append(Move(src.instance_id, dst.instance_id, src.num_decoding, while_prefilling=True))
                    break
            else:
                if not a.num_prefilling and not b.num_prefilling:
                    big, small = (a, b) if a.num_decoding >= b.num_decoding else (b, a)
                    surplus = big.num_decoding - small.num_decoding
                    if surplus >= self.move_threshold and big.num_decoding >= self.balance_ratio * small.num_decoding:
                        moves.append(Move(big.instance_id, small.instance_id, surplus // 2))
        return moves

    def on_death(self, dead, requests, instances, has_copy=lambda r, i: False) -> dict[str, Recovery]:
        partner = partner_of(dead)
        live = [s for s in instances if s.alive and s.instance_id != dead]
        partner_alive = any(s.instance_id == partner for s in live)
        out: dict[str, Recovery] = {}
        for req in requests:
            if partner_alive and has_copy(req.request_id, partner):
                out[req.request_id] = Recovery(partner, from_copy=True)
            else:
                out[req.request_id] = Recovery(self.route(req, live).prefill)
        return out


POLICIES: dict[str, type[RoutingPolicy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, PrefixAware, PDSplit, AcceLLM)
}


def make_policy(name: str, **options) -> RoutingPolicy:
    """A policy by its `--routing` name; options go to its constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise InvalidRequestError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(**options)
