"""Parallel engine settings: bad combinations fail before any process starts."""

from __future__ import annotations

import pytest

from tessera.config import EngineConfig
from tessera.errors import InvalidRequestError


@pytest.mark.parametrize("kw, match", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
    ({"sequence_parallel_size": 2, "sequence_parallel_mode": "star"}, "ring or tokenring"),
    ({"tensor_parallel_size": 2, "sequence_parallel_size": 2}, "cannot both"),
    ({"tensor_parallel_size": 2, "enable_lora": True}, "enable_lora is not supported"),
    ({"sequence_parallel_size": 2, "weight_memory": "1GiB"}, "weight_memory is not supported"),
    ({"tensor_parallel_size": 2, "distributed_timeout_s": 0}, "distributed_timeout_s must be positive"),
    ({"expert_parallel_size": 0}, "expert_parallel_size must be a positive integer"),
    ({"expert_parallel_size": 2, "tensor_parallel_size": 2}, "cannot both"),
    ({"moe_placement": "p.json"}, "needs expert_parallel_size > 1"),
])
def test_bad_parallel_settings_are_refused(kw, match):
    with pytest.raises(InvalidRequestError, match=match):
        EngineConfig(**kw).validate()


def test_parallel_size():
    assert EngineConfig().parallel_size == 1
    assert EngineConfig(sequence_parallel_size=4).parallel_size == 4
    assert EngineConfig(expert_parallel_size=2).parallel_size == 2


def test_expert_parallel_flags():
    import argparse

    from tessera.config import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    kw = engine_kwargs(parser.parse_args(["--expert-parallel-size", "2", "--moe-placement", "p.json"]))
    assert kw["expert_parallel_size"] == 2 and kw["moe_placement"] == "p.json"
