"""References inside a step's input template: `${input.a.b}`, `${steps.plan.output.files}`.

Forms (PATH is dot-separated keys; a key of digits indexes an array):

    ${input}                  the run's input
    ${input.PATH}             a part of it
    ${steps.ID.output}        the output of step ID (null when ID was skipped)
    ${steps.ID.output.PATH}   a part of it
    ${steps.ID.error}         why step ID failed (null when it did not)

A string that is exactly one reference becomes the referenced value, keeping its type. A
reference inside a longer string is replaced by the value's text: strings as they are, anything
else as compact JSON. `$${` writes a literal `${`. Object keys are never resolved.

Resolution happens when the step starts. A path that does not exist (a missing key, an index out
of range, a step of the run that is not in scope) raises `RefError`, whose message names the
reference; the engine then fails the step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Ref", "RefError", "Scope", "find_refs", "lookup", "parse_ref", "resolve"]

# `$${...}` (escaped) or `${...}`; a `${` left without its `}` is caught separately.
_TOKEN = re.compile(r"\$(\$?)\{([^{}]*)\}")
_KEY = re.compile(r"[A-Za-z0-9_-]+")
_FORMS = "${input}, ${input.PATH}, ${steps.ID.output}, ${steps.ID.output.PATH} or ${steps.ID.error}"


class RefError(ValueError):
    """A reference is malformed, or names something that is not there."""


@dataclass(frozen=True, slots=True)
class Ref:
    """One parsed reference. `step` and `field` are empty for `${input...}`."""

    text: str
    step: str
    field: str
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Scope:
    """What references may see: the run's input, and per step id its output and error.

    `output` and `error` raise KeyError for a step that is not in scope.
    """

    input: Any
    output: Callable[[str], Any]
    error: Callable[[str], str | None]


def parse_ref(body: str) -> Ref:
    """Parse the text between `${` and `}`."""
    text = "${" + body + "}"
    parts = body.strip().split(".")
    if any(not _KEY.fullmatch(part) for part in parts):
        raise RefError(f"malformed reference {text}: use {_FORMS}")
    if parts[0] == "input":
        return Ref(text, "", "", tuple(parts[1:]))
    if parts[0] == "steps" and len(parts) >= 3 and parts[2] == "output":
        return Ref(text, parts[1], "output", tuple(parts[3:]))
    if parts[0] == "steps" and len(parts) == 3 and parts[2] == "error":
        return Ref(text, parts[1], "error", ())
    raise RefError(f"malformed reference {text}: use {_FORMS}")


def refs_in_string(value: str) -> Iterator[Ref]:
    """The references in one string; raises RefError for a malformed one or an unclosed `${`."""
    for match in _TOKEN.finditer(value):
        if not match.group(1):
            yield parse_ref(match.group(2))
    rest = _TOKEN.sub("", value)
    start = rest.find("${")
    if start >= 0:
        shown = rest[start : start + 40]
        raise RefError(f"malformed reference {shown!r}: '${{' without a closing '}}'")


def find_refs(template: Any, where: str = "input") -> Iterator[tuple[str, Ref]]:
    """Every reference in a JSON template, with where it sits (`input.files.0`)."""
    if isinstance(template, str):
        try:
            for ref in refs_in_string(template):
                yield where, ref
        except RefError as exc:
            raise RefError(f"{where}: {exc}") from None
    elif isinstance(template, Mapping):
        for key, value in template.items():
            yield from find_refs(value, f"{where}.{key}")
    elif isinstance(template, list | tuple):
        for index, value in enumerate(template):
            yield from find_refs(value, f"{where}.{index}")


def resolve(template: Any, scope: Scope) -> Any:
    """A copy of the template with every reference replaced by its value."""
    if isinstance(template, str):
        return _resolve_string(template, scope)
    if isinstance(template, Mapping):
        return {key: resolve(value, scope) for key, value in template.items()}
    if isinstance(template, list | tuple):
        return [resolve(value, scope) for value in template]
    return template


def lookup(ref: Ref, scope: Scope) -> Any:
    """The value a reference points to; RefError when it is not there."""
    if not ref.step:
        root, what = scope.input, "the run's input"
    else:
        try:
            if ref.field == "error":
                return scope.error(ref.step)
            root = scope.output(ref.step)
        except KeyError:
            raise RefError(f"{ref.text}: step {ref.step!r} is not upstream") from None
        what = f"the output of step {ref.step!r}"
    value = root
    for depth, key in enumerate(ref.path):
        at = ".".join(ref.path[:depth]) or "the top"
        if isinstance(value, Mapping):
            if key not in value:
                raise RefError(f"{ref.text}: {what} has no key {key!r} at {at}")
            value = value[key]
        elif isinstance(value, list):
            if not key.isdigit() or int(key) >= len(value):
                raise RefError(
                    f"{ref.text}: {what} has a list of {len(value)} at {at}, no item {key!r}"
                )
            value = value[int(key)]
        else:
            kind = "null" if value is None else type(value).__name__
            raise RefError(f"{ref.text}: {what} is {kind} at {at}, not an object or a list")
    return value


def _resolve_string(value: str, scope: Scope) -> Any:
    match = _TOKEN.fullmatch(value)
    if match and not match.group(1):
        return lookup(parse_ref(match.group(2)), scope)
    list(refs_in_string(value))  # raise on a malformed one before replacing anything

    def replace(found: re.Match[str]) -> str:
        if found.group(1):
            return "${" + found.group(2) + "}"
        return _text(lookup(parse_ref(found.group(2)), scope))

    return _TOKEN.sub(replace, value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
