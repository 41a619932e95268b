"""Builds the `Authenticator` from the settings; `ConfigurationError` says what to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentpost_server.auth.authenticator import Authenticator
from agentpost_server.auth.tokens import TokensFile, TokensFileError
from agentpost_server.settings import Settings

if TYPE_CHECKING:
    from agentpost_server.auth.jwts import JwtVerifier


class ConfigurationError(Exception):
    """The server cannot start as configured; the text is one line saying what to set."""


def authenticator(settings: Settings) -> Authenticator:
    tokens = None
    if settings.tokens_file is not None:
        try:
            tokens = TokensFile.load(settings.tokens_file)
        except TokensFileError as exc:
            raise ConfigurationError(str(exc)) from None
    verifier = None
    if settings.jwt_secret is not None or settings.jwt_public_key_file is not None:
        verifier = _jwt_verifier(settings)
    return Authenticator(tokens=tokens, jwt=verifier)


def _jwt_verifier(settings: Settings) -> JwtVerifier:
    try:
        from agentpost_server.auth.jwts import HMAC, PUBLIC_KEY, JwtVerifier
    except ModuleNotFoundError:
        raise ConfigurationError(
            "JWT authentication needs PyJWT: pip install 'agentpost[server]'"
        ) from None
    if settings.jwt_secret is not None and settings.jwt_public_key_file is not None:
        raise ConfigurationError(
            "set AGENTPOST_JWT_SECRET or AGENTPOST_JWT_PUBLIC_KEY_FILE, not both"
        )
    if settings.jwt_secret is not None:
        key: str | bytes = settings.jwt_secret.get_secret_value()
        algorithms: tuple[str, ...] = HMAC
    else:
        assert settings.jwt_public_key_file is not None
        try:
            key = settings.jwt_public_key_file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read AGENTPOST_JWT_PUBLIC_KEY_FILE: {exc}") from None
        algorithms = PUBLIC_KEY
    return JwtVerifier(key, algorithms, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
