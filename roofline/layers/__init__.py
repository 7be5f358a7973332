"""Shared building blocks that every model family is assembled from."""
