"""`make bench`: agentpost's throughput and latency on this machine, next to a raw-gRPC ceiling.

One throwaway `redis-server`, one agentpost server process and the clients in this process
(pinned to different cores when there are at least two), then the same patterns over a minimal
`grpc.aio` relay (`python -m bench.relay`). `python -m bench --help` lists the options.
"""
