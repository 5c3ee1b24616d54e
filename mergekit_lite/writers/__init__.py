"""What a merge writes: sharded safetensors, the side files, the model card, atomically."""
