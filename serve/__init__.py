"""Serving: the gRPC Generate service over a continuous-batching engine."""
