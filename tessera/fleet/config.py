"""`tessera serve --instances N`'s flags, one per FleetConfig field (tessera/config_args.py).

Importable without Ray or the server extras: the command line is built before anything starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from tessera.config_args import add_config_args, arg, config_kwargs
from tessera.errors import InvalidRequestError

ROUTING = ["round-robin", "least-loaded", "prefix", "pd-split", "accellm"]  # tessera.fleet.policies.POLICIES


@dataclass
class FleetConfig:
    instances: int = arg(1, "engine instances behind one router (1: a single engine, no router)")
    backend: str = arg("ray", "where the instances run: Ray actors (a local cluster, or --ray-address), or "
                       "threads of this process (local: tests and debugging)", choices=["ray", "local"])
    routing: str = arg("least-loaded", "how the router places requests: round-robin, least-loaded, prefix "
                       "(longest cached prefix), pd-split (prefill/decode instances, KV moved after the "
                       "prefill), accellm (instance pairs with redundant KV and switching roles)",
                       choices=ROUTING)
    ray_address: str | None = arg(None, "join this Ray cluster (ray.init's address, e.g. auto or "
                                  "ray://host:10001) instead of starting a local one")
    instance_threads: int = arg(1, "CPU threads of each Ray instance (engine actors share the machine's cores; "
                                "--backend local shares this process's threads)")

    def validate(self) -> None:
        if self.instances < 1:
            raise InvalidRequestError(f"--instances must be >= 1, got {self.instances}")
        if self.instance_threads < 1:
            raise InvalidRequestError(f"--instance-threads must be >= 1, got {self.instance_threads}")
        from tessera.fleet.policies import make_policy

        make_policy(self.routing).roles(self.instances)  # pd-split needs 2+, accellm an even count

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> FleetConfig:
        return cls(**config_kwargs(args, cls))


def add_fleet_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser.add_argument_group("fleet"), FleetConfig)
