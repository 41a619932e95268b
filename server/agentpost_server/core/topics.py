"""Which local subscribers a topic reaches: exact names by lookup, patterns by token match."""

from __future__ import annotations

from collections import defaultdict
from typing import Generic, TypeVar

K = TypeVar("K")


SYSTEM_TOKEN = "_agentpost"


def pattern_matches(pattern: list[str], tokens: list[str]) -> bool:
    """NATS-style: `*` matches exactly one token, a final `>` one or more. System topics
    (`_agentpost.…`) match only patterns that name that first token: `>` alone does not."""
    if tokens[0] == SYSTEM_TOKEN and pattern[0] != SYSTEM_TOKEN:
        return False
    for index, part in enumerate(pattern):
        if part == ">":
            return len(tokens) > index
        if index >= len(tokens):
            return False
        if part != "*" and part != tokens[index]:
            return False
    return len(pattern) == len(tokens)


class TopicIndex(Generic[K]):
    """Subscriptions of many subscribers (keys); `match` returns each subscriber at most once,
    however many of its patterns match."""

    def __init__(self) -> None:
        self._exact: dict[str, set[K]] = defaultdict(set)
        self._wild: dict[str, tuple[list[str], set[K]]] = {}

    def add(self, key: K, pattern: str) -> None:
        if "*" in pattern or ">" in pattern.split(".")[-1:]:
            entry = self._wild.setdefault(pattern, (pattern.split("."), set()))
            entry[1].add(key)
        else:
            self._exact[pattern].add(key)

    def remove(self, key: K, pattern: str) -> None:
        exact = self._exact.get(pattern)
        if exact is not None:
            exact.discard(key)
            if not exact:
                del self._exact[pattern]
        wild = self._wild.get(pattern)
        if wild is not None:
            wild[1].discard(key)
            if not wild[1]:
                del self._wild[pattern]

    def match(self, topic: str) -> set[K]:
        found: set[K] = set(self._exact.get(topic, ()))
        if self._wild:
            tokens = topic.split(".")
            for parts, keys in self._wild.values():
                if pattern_matches(parts, tokens):
                    found |= keys
        return found
