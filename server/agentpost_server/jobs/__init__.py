"""arq worker settings and job functions: thin wrappers over the core."""
