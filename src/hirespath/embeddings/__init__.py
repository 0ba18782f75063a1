"""Producing and storing embeddings: the ROI embedding cache."""
