"""Each routing policy's decisions on hand-made snapshots of instance state."""

from __future__ import annotations

import pytest

from tessera.errors import InvalidRequestError
from tessera.fleet.policies import (
    POLICIES,
    CopyInfo,
    Handoff,
    InstanceState,
    Move,
    Placement,
    Recovery,
    RequestInfo,
    Role,
    make_policy,
    split_roles,
)


def req(rid="r", n=32, max_tokens=8, tokens=None):
    return RequestInfo(rid, tuple(tokens if tokens is not None else range(n)), max_tokens)


def inst(i, **kw):
    kw.setdefault("free_blocks", 100)
    return InstanceState(i, **kw)


def test_make_policy_names_and_unknown():
    assert set(POLICIES) == {"round-robin", "least-loaded", "prefix", "pd-split", "accellm"}
    assert make_policy("prefix", balance_slack=3).balance_slack == 3
    with pytest.raises(InvalidRequestError, match="unknown routing policy"):
        make_policy("random")


def test_round_robin_cycles_and_skips_dead():
    p = make_policy("round-robin")
    fleet = [inst(0), inst(1), inst(2)]
    assert [p.route(req(), fleet).prefill for _ in range(4)] == [0, 1, 2, 0]
    fleet[1] = inst(1, alive=False)
    assert [p.route(req(), fleet).prefill for _ in range(3)] == [2, 0, 2]
    with pytest.raises(InvalidRequestError, match="no live instance"):
        p.route(req(), [inst(0, alive=False)])


def test_least_loaded_counts_sequences_then_kv_then_id():
    p = make_policy("least-loaded")
    fleet = [inst(0, num_running=3), inst(1, num_running=1, num_waiting=1), inst(2, num_waiting=2)]
    assert p.route(req(), fleet).prefill == 1  # 2 = 2 < 3: tie on load, same KV -> lower id
    fleet = [inst(0, num_running=2, used_blocks=50, free_blocks=50), inst(1, num_running=2, used_blocks=10)]
    assert p.route(req(), fleet).prefill == 1  # equal load, less KV in use
    assert p.route(req(), [inst(0, num_running=9), inst(1, alive=False)]).prefill == 0


def test_prefix_aware_longest_match_with_load_guard():
    p = make_policy("prefix", min_match_tokens=16, balance_slack=4)
    prompt = tuple(range(100))
    cached = {0: 16, 1: 64, 2: 0}
    fleet = [inst(i, num_running=r, prefix_match=lambda t, i=i: cached[i]) for i, r in ((0, 0), (1, 3), (2, 0))]
    assert p.route(req(tokens=prompt), fleet).prefill == 1  # longest prefix, load within the slack
    busy = [fleet[0], inst(1, num_running=5, prefix_match=lambda t: 64), fleet[2]]
    assert p.route(req(tokens=prompt), busy).prefill == 0  # 5 > 0 + 4: least-loaded wins
    short = {0: 8, 1: 8, 2: 8}
    fleet = [inst(i, num_running=2 - i, prefix_match=lambda t, i=i: short[i]) for i in range(3)]
    assert p.route(req(tokens=prompt), fleet).prefill == 2  # no match worth a block: least-loaded


def test_pd_split_roles_and_handoff_moves_kv():
    assert split_roles(4) == [Role.PREFILL] * 2 + [Role.DECODE] * 2
    assert split_roles(3, 1) == [Role.PREFILL, Role.DECODE, Role.DECODE]
    with pytest.raises(InvalidRequestError):
        split_roles(1)
    with pytest.raises(InvalidRequestError):
        split_roles(2, 2)
    p = make_policy("pd-split")
    roles = p.roles(4)
    fleet = [inst(i, role=r, num_running=[3, 1, 0, 2][i]) for i, r in enumerate(roles)]
    assert p.route(req(), fleet) == Placement(1)
    assert p.after_prefill(req(), 1, fleet) == Handoff(decode=2, move_kv=True)
    # With every decode instance dead, a prefill instance keeps decoding what it prefilled.
    dead = [fleet[0], fleet[1], inst(2, role=Role.DECODE, alive=False), inst(3, role=Role.DECODE, alive=False)]
    h = p.after_prefill(req(), 1, dead)
    assert h.decode in (0, 1) and h.move_kv == (h.decode != 1)


def test_accellm_needs_even_instances():
    with pytest.raises(InvalidRequestError, match="even"):
        make_policy("accellm").roles(3)
    assert make_policy("accellm").roles(4) == [Role.MIXED] * 4


def test_accellm_routes_to_lighter_pair_and_replicates_to_partner():
    p = make_policy("accellm")
    fleet = [inst(0, num_running=4), inst(1, num_running=4), inst(2, num_running=1), inst(3, num_running=2)]
    pl = p.route(req(), fleet)
    assert pl == Placement(2, replicate_to=3)  # pair 1 is lighter; member 2 decodes fewer


def test_accellm_prefill_role_sticks_then_switches_with_backlog():
    p = make_policy("accellm", prefill_backlog=2)
    # Member 1 is prefilling: prompts keep going there (its partner keeps decoding undisturbed).
    fleet = [inst(0, num_running=1), inst(1, num_running=3, num_prefilling=2)]
    assert p.route(req(), fleet) == Placement(1, replicate_to=0)
    # Its backlog grows past the partner's by more than 2: the role switches to the lighter member.
    fleet = [inst(0, num_running=1), inst(1, num_running=6, num_prefilling=5)]
    assert p.route(req(), fleet) == Placement(0, replicate_to=1)
    # In prompt tokens: member 1's decodes left for its partner, but one long prompt is already more than
    # a step's budget ahead of it, so the partner (4 decodes, no prompt) prefills too.
    p = make_policy("accellm", prefill_backlog_tokens=2048)
    fleet = [inst(0, num_running=4), inst(1, num_running=1, num_prefilling=1, prefill_tokens=3000)]
    assert p.route(req(), fleet) == Placement(0, replicate_to=1)
    fleet = [inst(0, num_running=4), inst(1, num_running=1, num_prefilling=1, prefill_tokens=1500)]
    assert p.route(req(), fleet) == Placement(1, replicate_to=0)


def test_accellm_after_prefill_decodes_on_partner_while_prefilling():
    p = make_policy("accellm")
    fleet = [inst(0, num_running=2, num_prefilling=1), inst(1, num_running=5)]
    assert p.after_prefill(req(), 0, fleet, has_copy=lambda i: True) == Handoff(decode=1, keep_copy=True)
    # Both members prefill: moving would not spare the decode a prefill step; it stays.
    fleet = [inst(0, num_running=2, num_prefilling=1), inst(1, num_running=5, num_prefilling=1)]
    assert p.after_prefill(req(), 0, fleet, has_copy=lambda i: True) == Handoff(decode=0, keep_copy=True)
    # No prompt left on the prefill member: the member with fewer decodes takes it.
    fleet = [inst(0, num_running=2), inst(1, num_running=5)]
    assert p.after_prefill(req(), 0, fleet, has_copy=lambda i: True) == Handoff(decode=0, keep_copy=True)
    # The partner's copy was dropped (memory pressure): decode where the KV is.
    fleet = [inst(0, num_running=2, num_prefilling=1), inst(1, num_running=0)]
    assert p.after_prefill(req(), 0, fleet, has_copy=lambda i: False) == Handoff(decode=0)


def test_accellm_rebalance_within_pairs():
    p = make_policy("accellm", move_threshold=2)
    fleet = [inst(0, num_running=5, num_prefilling=1), inst(1, num_running=2),  # 0 prefills: its 4 decodes leave
             inst(2, num_running=7), inst(3, num_running=1),  # both decode: 6 surplus -> 3 move
             inst(4, num_running=3), inst(5, num_running=2),  # surplus 1 < 2: stays
             inst(6, num_running=10), inst(7, num_running=7)]  # surplus 3 but 10 < 1.5 x 7: stays (hysteresis)
    assert p.rebalance(fleet) == [Move(0, 1, 4, while_prefilling=True), Move(2, 3, 3)]
    # a prefill smaller than evict_prefill_tokens keeps the decodes where they are
    short = [inst(0, num_running=5, num_prefilling=1, prefill_tokens=100), inst(1, num_running=2)]
    assert make_policy("accellm", evict_prefill_tokens=256).rebalance(short) == []
    assert make_policy("accellm").rebalance(short) == [Move(0, 1, 4, while_prefilling=True)]
    assert make_policy("least-loaded").rebalance(fleet) == []


def test_redundant_copies_dropped_first_oldest_first():
    p = make_policy("accellm")
    copies = [CopyInfo("a", 4, redundant=False, last_step=0), CopyInfo("b", 3, redundant=True, last_step=5),
              CopyInfo("c", 2, redundant=True, last_step=1), CopyInfo("d", 6, redundant=True, last_step=9)]
    assert p.copies_to_drop(copies, 4) == ["c", "b"]  # 2 + 3 >= 4; "a" is an only copy: never
    assert p.copies_to_drop(copies, 100) == ["c", "b", "d"]
    assert p.copies_to_drop(copies, 0) == []


def test_on_death_partner_takes_over_from_copy():
    p = make_policy("accellm")
    fleet = [inst(0, alive=False), inst(1, num_running=3), inst(2, num_running=0), inst(3, num_running=0)]
    reqs = [req("x"), req("y")]
    out = p.on_death(0, reqs, fleet, has_copy=lambda r, i: r == "x" and i == 1)
    assert out["x"] == Recovery(1, from_copy=True)
    assert out["y"].from_copy is False and out["y"].instance in (2, 3)  # rerun on the lighter pair
    # Other policies rerun from the prompt on a live instance.
    ll = make_policy("least-loaded").on_death(0, reqs, fleet)
    assert ll == {"x": Recovery(2), "y": Recovery(2)}
