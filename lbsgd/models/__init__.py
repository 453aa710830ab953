"""Flax models (imports only jax/flax)."""
