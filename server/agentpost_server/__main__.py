"""`python -m agentpost_server`: the same as `agentpost serve` (settings from AGENTPOST_*)."""

import sys

from agentpost_server.app import serve_main

sys.exit(serve_main())
