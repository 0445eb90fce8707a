"""Every `tessera bench` subcommand has a runner, and every runner exists."""

from __future__ import annotations

import argparse
import importlib

from tessera.bench import RUNNERS, add_bench_args, run_bench


def _subcommands() -> set[str]:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_subcommand_has_a_runner_and_back():
    assert _subcommands() == set(RUNNERS)


def test_every_runner_resolves_to_a_function():
    for name, target in RUNNERS.items():
        module_name, function_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), function_name)), name


def test_unknown_bench_is_refused(capsys):
    assert run_bench(argparse.Namespace(bench="no-such-bench")) == 2
    assert "unknown bench no-such-bench" in capsys.readouterr().err
