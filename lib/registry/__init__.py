"""Tracking and the registry: MLflow runs and lineage, model versions and aliases, promotion."""
