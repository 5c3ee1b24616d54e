"""PEFT's path: load base + adapters, add_weighted_adapter, then merge_and_unload + save_pretrained of the model, or
(--adapter) save_pretrained of the merged adapter alone (peers venv)."""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

args = sys.argv[1:]
adapter_only = args[0] == "--adapter"
if adapter_only:
    args = args[1:]
base, out, combination = args[0], args[1], args[2]
adapters = args[3:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
names = [f"a{i}" for i in range(len(adapters))]
model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
for name, path in zip(names[1:], adapters[1:]):
    model.load_adapter(path, adapter_name=name)
extra = {"density": 0.5} if combination in ("ties", "dare_ties") else {}
if combination == "svd":
    rank = model.peft_config[names[0]].r
    extra = {"svd_rank": rank}
model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, **extra)
model.set_adapter("merged")
if adapter_only:
    model.save_pretrained(out, selected_adapters=["merged"], safe_serialization=True)
else:
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
