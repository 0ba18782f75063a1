"""Lightning callbacks (the embeddings prediction writer)."""
