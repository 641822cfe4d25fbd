"""Model format: GGUF reading, the shard plan, slice extraction and shard files (the layer below compute)."""
