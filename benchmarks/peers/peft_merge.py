"""PEFT's path: load base + adapters, add_weighted_adapter, merge_and_unload, save_pretrained (peers venv)."""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, out, combination = sys.argv[1], sys.argv[2], sys.argv[3]
adapters = sys.argv[4:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
names = [f"a{i}" for i in range(len(adapters))]
model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
for name, path in zip(names[1:], adapters[1:]):
    model.load_adapter(path, adapter_name=name)
extra = {} if combination == "cat" else {"density": 0.5}
model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, **extra)
model.set_adapter("merged")
model.merge_and_unload().save_pretrained(out, safe_serialization=True)
