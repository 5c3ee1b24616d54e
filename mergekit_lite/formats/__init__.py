"""The safetensors vocabulary: file layout, dtypes, index, and re-reading written checkpoints."""
