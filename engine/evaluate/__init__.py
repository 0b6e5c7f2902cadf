"""Embeddings and (later) realism metrics."""
