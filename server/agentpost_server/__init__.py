"""The agentpost server: a gRPC service over Redis. Entry points live in `agentpost_server.app`."""
