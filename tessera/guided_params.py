"""GuidedDecodingParams: the constraint one request's output must satisfy (vLLM's shape).

Exactly one kind is set: `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (a list
of strings, the output is one of them), `grammar` (EBNF/GBNF as xgrammar takes it) or
`json_object=True` (any JSON object). Here only the shape is checked; whether the schema, regex or
grammar compiles is checked when the engine compiles it (tessera.engine.guided), with the same error
type. The grammar engine is xgrammar (see tessera.engine.guided for why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tessera.errors import InvalidRequestError

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class GuidedDecodingParams:
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # xgrammar lets JSON whitespace be any run of spaces and newlines; a small model can then pad
    # forever and never close the object. Compact JSON (", " and ": " separators) is the default here;
    # False allows any whitespace, as vLLM's default.
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid guided_decoding: {msg}")

        kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise bad(f"set exactly one of {', '.join(KINDS)}; got {', '.join(kinds) or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except ValueError as e:
                    raise bad(f"json is not a valid JSON schema text: {e}") from None
            if not isinstance(self.json, dict | bool):
                raise bad(f"json must be a JSON schema object, got {type(self.json).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise bad(f"regex must be a non-empty string, got {self.regex!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise bad(f"grammar must be a non-empty string, got {self.grammar!r}")
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple) or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise bad(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise bad(f"json_object must be a boolean, got {self.json_object!r}")

    def cache_key(self) -> tuple[str, str, bool]:
        """The same constraint gives the same key, so it is compiled once."""
        value: Any = getattr(self, self.kind)
        text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
        return self.kind, text, self.disable_any_whitespace
