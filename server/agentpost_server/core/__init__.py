"""The domain: routing, presence, requests. Imports neither grpc nor redis."""
