"""The tokens file: opaque bearer tokens, stored only as their SHA-256 hashes.

JSON (or TOML, by the `.toml` suffix), read once when the server starts:

    {"tokens": [{"sha256": "<hex of sha256(token)>", "agent_id": "coder",
                 "roles": ["admin"], "capabilities": ["code"],
                 "publish": ["builds.>"], "subscribe": ["builds.>", "_agentpost.agents.*"],
                 "expires_at": 1767225600}]}

Every field but `sha256` and `agent_id` may be left out (nothing allowed; no expiry).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentpost_server.core import names
from agentpost_server.core.auth import Principal

TOKEN_PREFIX = "apt_"


class TokensFileError(ValueError):
    """The tokens file cannot be read or holds an invalid entry (the text says which)."""


@dataclass(frozen=True, slots=True)
class Entry:
    principal: Principal
    expires_at: float | None  # unix seconds


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def principal_from_claims(agent_id: Any, claims: Mapping[str, Any], what: str) -> Principal:
    """A principal from the claims shared by tokens-file entries and JWTs; ValueError if one is
    malformed (`what` names the entry in the message)."""
    if not isinstance(agent_id, str):
        raise ValueError(f"{what}: the agent id is missing")
    names.check_agent_id(agent_id)

    def strings(key: str, *alternatives: str) -> tuple[str, ...]:
        for name in (key, *alternatives):
            if name in claims:
                value = claims[name]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{what}: {name} must be a list of strings")
                return tuple(value)
        return ()

    publish = strings("publish", "pub")
    subscribe = strings("subscribe", "subs")
    for pattern in (*publish, *subscribe):
        names.check_pattern(pattern, "pattern")
    return Principal(
        agent_id=agent_id,
        roles=frozenset(strings("roles")),
        capabilities=frozenset(strings("capabilities", "caps")),
        publish=publish,
        subscribe=subscribe,
    )


def entry_json(token: str, principal: Principal, expires_at: float | None = None) -> dict[str, Any]:
    """The tokens-file entry for `token` (only its hash is kept)."""
    entry: dict[str, Any] = {
        "sha256": token_hash(token),
        "agent_id": principal.agent_id,
        "roles": sorted(principal.roles),
        "capabilities": sorted(principal.capabilities),
        "publish": list(principal.publish),
        "subscribe": list(principal.subscribe),
    }
    if expires_at is not None:
        entry["expires_at"] = int(expires_at)
    return entry


class TokensFile:
    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self._entries = dict(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> TokensFile:
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise TokensFileError(f"cannot read the tokens file {path}: {exc}") from None
        raw = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(raw, list):
            raise TokensFileError(f"{path}: expected an object with a list `tokens`")
        entries: dict[str, Entry] = {}
        for index, item in enumerate(raw):
            what = f"{path}: tokens[{index}]"
            try:
                if not isinstance(item, dict):
                    raise ValueError(f"{what} is not an object")
                digest = item.get("sha256")
                if not isinstance(digest, str) or len(digest) != 64:
                    raise ValueError(f"{what}: sha256 must be 64 hex digits")
                expires = item.get("expires_at")
                if expires is not None and not isinstance(expires, int | float):
                    raise ValueError(f"{what}: expires_at must be unix seconds")
                principal = principal_from_claims(item.get("agent_id"), item, what)
            except ValueError as exc:  # InvalidArgumentError is not one: name checks, below
                raise TokensFileError(str(exc)) from None
            except Exception as exc:
                raise TokensFileError(f"{what}: {getattr(exc, 'message', exc)}") from None
            entries[digest.lower()] = Entry(principal, float(expires) if expires else None)
        return cls(entries)

    def lookup(self, token: str) -> Entry | None:
        return self._entries.get(token_hash(token))


def append_entry(path: Path, entry: Mapping[str, Any]) -> None:
    """Add an entry to a JSON tokens file (created if missing), rewritten atomically."""
    data: dict[str, Any] = {"tokens": []}
    if path.exists():
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict) or not isinstance(loaded.get("tokens"), list):
            raise TokensFileError(f"{path}: expected an object with a list `tokens`")
        data = loaded
    data["tokens"].append(dict(entry))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def expired(entry_expires: float | None, now: float | None = None) -> bool:
    return entry_expires is not None and entry_expires <= (now or time.time())
