"""A step's `condition`: a tiny expression language, parsed by hand (no eval).

Grammar (keywords are lower case; whitespace separates tokens where needed):

    condition  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := operand [("==" | "!=" | "<" | "<=" | ">" | ">=") operand]
    operand    := REF | "exists(" REF ")" | "(" or ")" | literal
    literal    := "true" | "false" | "null" | NUMBER | "double-quoted" | 'single-quoted'
    REF        := ${input...} or ${steps.ID.output...} / ${steps.ID.error} (see refs)

Meaning:
* `==` and `!=` compare JSON values: a bool never equals a number, 1 equals 1.0.
* `<`, `<=`, `>`, `>=` compare two numbers or two strings; anything else is an error.
* `exists(REF)` is true when the path is there and not null. A bare REF elsewhere must be there.
* The condition holds when its value is truthy in JSON terms: false, null, 0, "", [] and {} are
  false, everything else is true.

An error while evaluating (a missing path, an ordering of mixed types) fails the step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agentpost_server.core.workflows.refs import Ref, RefError, Scope, lookup, parse_ref

__all__ = ["Condition", "ConditionError", "parse_condition"]

_TOKENS = re.compile(
    r"""\s*(?:
      (?P<ref>\$\{[^{}]*\})
    | (?P<op>==|!=|<=|>=|<|>|\(|\))
    | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<string>"(?:[^"\\]|\\.)*"|'[^']*')
    | (?P<word>[A-Za-z_]+)
    )""",
    re.VERBOSE,
)
_COMPARE = ("==", "!=", "<", "<=", ">", ">=")
_CONSTANTS: dict[str, Any] = {"true": True, "false": False, "null": None}


class ConditionError(ValueError):
    """A condition is malformed, or could not be evaluated."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    pos: int


# The syntax tree: tuples tagged by their first element.
#   ("lit", value) | ("ref", Ref) | ("exists", Ref) | ("not", node)
#   ("and", left, right) | ("or", left, right) | ("cmp", op, left, right)
_Node = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition; `refs` lists its references (for the upstream check)."""

    text: str
    tree: _Node
    refs: tuple[Ref, ...]

    def holds(self, scope: Scope) -> bool:
        try:
            return _truthy(_evaluate(self.tree, scope))
        except RefError as exc:
            raise ConditionError(str(exc)) from None


def parse_condition(text: str) -> Condition:
    tokens = list(_tokenize(text))
    parser = _Parser(tokens, text)
    tree = parser.parse_or()
    if parser.index < len(tokens):
        token = tokens[parser.index]
        raise ConditionError(f"unexpected {token.text!r} at position {token.pos + 1}")
    return Condition(text, tree, tuple(_refs(tree)))


def _tokenize(text: str) -> Iterator[_Token]:
    pos = 0
    while pos < len(text):
        match = _TOKENS.match(text, pos)
        if match is None or match.end() == pos:
            rest = text[pos:].lstrip()
            if not rest:
                return
            at = len(text) - len(rest) + 1
            raise ConditionError(f"unexpected {rest[:20]!r} at position {at}")
        kind = match.lastgroup
        assert kind is not None
        yield _Token(kind, match.group(kind), match.start(kind))
        pos = match.end()


class _Parser:
    def __init__(self, tokens: list[_Token], text: str) -> None:
        self.tokens = tokens
        self.text = text
        self.index = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise ConditionError(f"{self.text!r} ends early: an operand is missing")
        self.index += 1
        return token

    def at_word(self, word: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "word" and token.text == word

    def parse_or(self) -> _Node:
        node = self.parse_and()
        while self.at_word("or"):
            self.index += 1
            node = ("or", node, self.parse_and())
        return node

    def parse_and(self) -> _Node:
        node = self.parse_not()
        while self.at_word("and"):
            self.index += 1
            node = ("and", node, self.parse_not())
        return node

    def parse_not(self) -> _Node:
        if self.at_word("not"):
            self.index += 1
            return ("not", self.parse_not())
        left = self.parse_operand()
        token = self.peek()
        if token is not None and token.kind == "op" and token.text in _COMPARE:
            self.index += 1
            return ("cmp", token.text, left, self.parse_operand())
        return left

    def parse_operand(self) -> _Node:
        token = self.take()
        if token.kind == "ref":
            return ("ref", _ref(token))
        if token.kind == "number":
            return ("lit", json.loads(token.text))
        if token.kind == "string":
            if token.text.startswith("'"):
                return ("lit", token.text[1:-1])
            return ("lit", json.loads(token.text))
        if token.kind == "op" and token.text == "(":
            node = self.parse_or()
            self.expect(")")
            return node
        if token.kind == "word" and token.text in _CONSTANTS:
            return ("lit", _CONSTANTS[token.text])
        if token.kind == "word" and token.text == "exists":
            self.expect("(")
            inner = self.take()
            if inner.kind != "ref":
                raise ConditionError(f"exists() takes a reference, at position {inner.pos + 1}")
            self.expect(")")
            return ("exists", _ref(inner))
        raise ConditionError(f"expected an operand at position {token.pos + 1}, got {token.text!r}")

    def expect(self, op: str) -> None:
        token = self.take()
        if token.kind != "op" or token.text != op:
            raise ConditionError(f"expected {op!r} at position {token.pos + 1}, got {token.text!r}")


def _ref(token: _Token) -> Ref:
    try:
        return parse_ref(token.text[2:-1])
    except RefError as exc:
        raise ConditionError(str(exc)) from None


def _refs(node: _Node) -> Iterator[Ref]:
    if node[0] in ("ref", "exists"):
        yield node[1]
    elif node[0] == "not":
        yield from _refs(node[1])
    elif node[0] in ("and", "or"):
        yield from _refs(node[1])
        yield from _refs(node[2])
    elif node[0] == "cmp":
        yield from _refs(node[2])
        yield from _refs(node[3])


def _evaluate(node: _Node, scope: Scope) -> Any:
    tag = node[0]
    if tag == "lit":
        return node[1]
    if tag == "ref":
        return lookup(node[1], scope)
    if tag == "exists":
        try:
            return lookup(node[1], scope) is not None
        except RefError:
            return False
    if tag == "not":
        return not _truthy(_evaluate(node[1], scope))
    if tag == "and":
        return _truthy(_evaluate(node[1], scope)) and _truthy(_evaluate(node[2], scope))
    if tag == "or":
        return _truthy(_evaluate(node[1], scope)) or _truthy(_evaluate(node[2], scope))
    return _compare(node[1], _evaluate(node[2], scope), _evaluate(node[3], scope))


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "==":
        return _equal(left, right)
    if op == "!=":
        return not _equal(left, right)
    numbers = _is_number(left) and _is_number(right)
    if not numbers and not (isinstance(left, str) and isinstance(right, str)):
        raise ConditionError(f"cannot order {_json(left)} and {_json(right)} with {op}")
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    return bool(left == right)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _truthy(value: Any) -> bool:
    return bool(value)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))[:40]
