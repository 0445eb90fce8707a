"""`tessera serve`'s fleet flags come from FleetConfig's fields; bad fleets are refused with a clear error."""

from __future__ import annotations

import pytest

from tessera.cli import build_parser
from tessera.errors import InvalidRequestError
from tessera.fleet.config import ROUTING, FleetConfig
from tessera.fleet.policies import POLICIES


def test_serve_flags_build_a_fleet_config():
    args = build_parser().parse_args(["serve", "--instances", "4", "--routing", "accellm", "--ray-address", "auto",
                                      "--instance-threads", "2", "--max-num-seqs", "8"])
    cfg = FleetConfig.from_cli_args(args)
    assert cfg == FleetConfig(instances=4, backend="ray", routing="accellm", ray_address="auto", instance_threads=2)
    assert args.max_num_seqs == 8  # the engine's own flags are still there
    assert ROUTING == list(POLICIES)


@pytest.mark.parametrize("kw, message", [
    (dict(instances=3, routing="accellm"), "even number"),
    (dict(instances=1, routing="pd-split"), "at least 2"),
    (dict(instances=0), "--instances"),
    (dict(instances=2, instance_threads=0), "--instance-threads"),
])
def test_bad_fleets_are_refused(kw, message):
    with pytest.raises(InvalidRequestError, match=message):
        FleetConfig(**kw).validate()
