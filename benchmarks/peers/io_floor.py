"""The I/O floor: read every tensor of a checkpoint with safetensors and write it back, shard by shard."""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

source, target = Path(sys.argv[1]), Path(sys.argv[2])
target.mkdir(parents=True, exist_ok=True)
for shard in sorted(source.glob("*.safetensors")):
    with safe_open(str(shard), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
    del tensors
