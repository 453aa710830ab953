"""Workers, meshes and cross-worker communication (knows pytrees, never a model or dataset)."""
