"""Shared state across servers (Redis)."""
