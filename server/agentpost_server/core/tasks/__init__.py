"""Task handoffs: a task record, its state machine (`lifecycle`) and the service that reads,
decides and commits (`service`). Imports neither grpc nor redis."""
