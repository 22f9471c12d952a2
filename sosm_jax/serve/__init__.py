"""Serving: the generation engine, the model registry with fallback, metrics, the HTTP app."""
