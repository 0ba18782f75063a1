"""Producing and storing embeddings: the ROI embedding cache (cache.py) and whole slides to TRIDENT h5 files."""
