"""Who is calling: one function for every servicer method.

Without authentication the caller is who it says it is: the `agentpost-agent-id` metadata, or
"anonymous" (which may inspect everything, as an operator's CLI would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from agentpost_server.core import names

IDENTITY_METADATA = "agentpost-agent-id"
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    agent_id: str
    is_admin: bool = False


def caller(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    for key, value in context.invocation_metadata() or ():
        if key == IDENTITY_METADATA:
            text = value.decode() if isinstance(value, bytes) else value
            return Caller(names.check_agent_id(text, IDENTITY_METADATA))
    return Caller(ANONYMOUS, is_admin=True)
