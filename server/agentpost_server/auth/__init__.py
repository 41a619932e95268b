"""Credentials: bearer tokens listed in a tokens file, signed JWTs and client certificates, each
turned into a `core.auth.Principal`. Neither grpc nor redis: `rpc.auth` hands in what the call
carried."""
