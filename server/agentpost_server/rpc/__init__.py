"""The only server package that imports grpc: a thin servicer over the core."""
