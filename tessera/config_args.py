"""Command-line flags generated from configuration dataclasses (vLLM's EngineArgs shape).

A dataclass field with a `help` in its metadata is a flag: its spelling, type and default come from the
field, so a new knob needs one line in its dataclass to appear on every command that takes that
dataclass's flags. Field metadata:

    help          the flag's help text (a field without one has no flag)
    flags         its spellings (default: --field-name); the first one names the argparse dest
    choices       the values it accepts
    type          the parser of a value (default: the annotation's int, float or str)
    zero_is_none  an optional count whose None is spelled 0 on the command line
    nargs         argparse's nargs, for a list field ("+": one or more values)

A bool (or `bool | None`) is an `argparse.BooleanOptionalAction`: --flag / --no-flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import NamedTuple


class CliField(NamedTuple):
    field: dataclasses.Field
    kind: type  # bool, int, float or str: the annotation without its None
    flags: tuple[str, ...]
    dest: str


def arg(default, help: str, **metadata):
    """A dataclass field that is a flag: `name: int = arg(16, "help text")`."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _kind(annotation) -> type | None:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return annotation


def cli_fields(cls) -> list[CliField]:
    """The fields of dataclass `cls` that are flags, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        flags = tuple(f.metadata.get("flags", ("--" + f.name.replace("_", "-"),)))
        out.append(CliField(f, _kind(hints[f.name]), flags, flags[0][2:].replace("-", "_")))
    return out


def add_config_args(group, cls, only: tuple[str, ...] | None = None) -> None:
    """Add a flag for each of `cls`'s flag fields (those named in `only`, if given) to `group` (a parser
    or an argument group)."""
    for c in cli_fields(cls):
        if only is not None and c.field.name not in only:
            continue
        meta = c.field.metadata
        default = c.field.default if c.field.default is not dataclasses.MISSING else c.field.default_factory()
        if default is None and meta.get("zero_is_none"):
            default = 0
        kw = dict(dest=c.dest, default=default, help=meta["help"])
        if c.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = meta.get("type", c.kind)
            if kw["type"] not in (int, float, str) and "type" not in meta:
                raise TypeError(f"{cls.__name__}.{c.field.name}: give its flag a 'type' in the field's metadata")
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            if "nargs" in meta:
                kw["nargs"] = meta["nargs"]
        group.add_argument(*c.flags, **kw)


def config_kwargs(args: argparse.Namespace, cls) -> dict:
    """The keyword arguments of `cls` that parsed flags `args` give (its flag fields only)."""
    out = {}
    for c in cli_fields(cls):
        value = getattr(args, c.dest)
        out[c.field.name] = None if value == 0 and c.field.metadata.get("zero_is_none") else value
    return out


def config_argv(config) -> list[str]:
    """The flags that give `config`'s flag fields (a None value is left out: its flag's default)."""
    argv = []
    for c in cli_fields(type(config)):
        value = getattr(config, c.field.name)
        if value is None and c.field.metadata.get("zero_is_none"):
            value = 0
        if value is None:
            continue
        flag = c.flags[0]
        if c.kind is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):  # name=value pairs (--models)
            argv += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
