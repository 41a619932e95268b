"""The listening port: TLS (mutual with a client CA), or plaintext when explicitly allowed."""

from __future__ import annotations

import ipaddress
import logging

import grpc

from agentpost_server.auth.setup import ConfigurationError
from agentpost_server.settings import Settings

log = logging.getLogger(__name__)

NO_TRANSPORT = (
    "no TLS configured: set AGENTPOST_TLS_CERT and AGENTPOST_TLS_KEY, or AGENTPOST_PLAINTEXT=true"
    " (agentpost serve --plaintext) to serve without TLS"
)


def check_transport(settings: Settings) -> None:
    """Raise `ConfigurationError` unless the settings name a usable transport (files read)."""
    if settings.tls_client_ca is not None and not settings.tls:
        raise ConfigurationError("AGENTPOST_TLS_CLIENT_CA needs AGENTPOST_TLS_CERT and _KEY too")
    if settings.tls:
        server_credentials(settings)
    elif not settings.plaintext:
        raise ConfigurationError(NO_TRANSPORT)


def add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind `settings.listen`; the port. Raises `ConfigurationError`."""
    check_transport(settings)
    if settings.tls:
        return server.add_secure_port(settings.listen, server_credentials(settings))
    host = settings.listen.rpartition(":")[0].strip("[]")
    where = "loopback only" if _loopback(host) else f"{host}, NOT only loopback"
    log.warning(
        "serving PLAINTEXT on %s (%s): anyone who can reach it can read the traffic and, without"
        " tokens, act as any agent; set AGENTPOST_TLS_CERT and AGENTPOST_TLS_KEY for production",
        settings.listen,
        where,
    )
    return server.add_insecure_port(settings.listen)


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigurationError("TLS needs both AGENTPOST_TLS_CERT and AGENTPOST_TLS_KEY")
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigurationError(f"cannot read a TLS file: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
