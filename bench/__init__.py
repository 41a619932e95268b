"""`make bench`: agentpost's throughput and latency on this machine, next to a raw-gRPC ceiling.

One throwaway `redis-server`, one agentpost server process and the clients in this process
(pinned to different cores when there are at least two), then the same patterns over a minimal
`grpc.aio` relay (`python -m bench.relay`). Task handoffs and workflows run against a second
redis-server and agentpost server, this one with the arq worker inside (workflow steps advance
through its jobs). `python -m bench --help` lists the options.
"""
