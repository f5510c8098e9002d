"""Tessera's common transformer core: attention, blocks, registry, config and MLflow model I/O."""
