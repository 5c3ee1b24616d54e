"""One adapter merged with ``linear`` must reproduce PEFT's ``merge_and_unload`` (SEMANTICS §1, §5).

Every adapter variant PEFT can save (plain, rsLoRA, rank/alpha patterns, DoRA, lora_bias, embedding LoRA,
modules_to_save, GPT-2 Conv1D) is merged by mergekit_lite and by PEFT on the same tiny base; the
checkpoints must agree tensor for tensor, and the merged models must give the same logits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evals.fixtures import VARIANTS, build_adapter  # noqa: E402

ATOL = RTOL = 1e-5
LOGITS_ATOL = 1e-4
PROMPTS = ["Hello, world!", "2+2=4. The end"]


@dataclass(frozen=True)
class Case:
    """One (base architecture, adapter variant) pair."""

    arch: str  # key into the ``bases`` fixture
    variant: str

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.variant}"


CASES = [Case("llama_bias" if v == "bias" else "llama", v) for v in VARIANTS] + [Case("gpt2", "lora")]
CASE_IDS = [c.id for c in CASES]


def _merge(base: Path, adapter: Path, out: Path, chunk_rows: int | None = None, **output: Any) -> Path:
    """Merge one adapter with weight 1.0 through the public API and return the written checkpoint folder."""
    from mergekit_lite import MergeConfig, merge

    cfg = MergeConfig.from_dict({
        "base_model": str(base),
        "method": "linear",
        "adapters": [{"path": str(adapter), "weight": 1.0}],
        "output": {"path": str(out), **output},
    })
    result = merge(cfg, device="cpu", chunk_rows=chunk_rows, overwrite=False, progress=False)
    return Path(result.output_dir)


def _load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, single file or sharded with an index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(folder / name)
        assert not set(part) & set(tensors), f"tensor names repeated across shards in {folder}"
        tensors.update(part)
    return tensors


def _peft_merged(base: Path, adapter: Path) -> Any:
    """PEFT's own answer: base + adapter, merged and unloaded, in float32 on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    """Logits of the fixed prompts (left-padded batch), the same inputs for both models compared."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest, bases: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base, adapter, PEFT's merged model and state dict for one case (built once per case)."""
    c: Case = request.param
    base = bases[c.arch]
    adapter = build_adapter(base, tmp_path_factory.mktemp(f"adapter-{c.id}") / "adapter", c.variant)
    peft_model = _peft_merged(base, adapter)
    return {
        "case": c,
        "base": base,
        "adapter": adapter,
        "peft_model": peft_model,
        "peft_state": {k: v.detach().clone() for k, v in peft_model.state_dict().items()},
        "base_state": load_file(base / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def ours(case: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our merge of the case's adapter (default chunking), written once per case."""
    return _merge(case["base"], case["adapter"], tmp_path_factory.mktemp(f"ours-{case['case'].id}") / "merged")


def _assert_matches_peft(merged: dict[str, torch.Tensor], case: dict[str, Any]) -> None:
    """Same tensor names, shapes and dtypes as the base checkpoint; values within ATOL/RTOL of PEFT's merge;
    tensors PEFT leaves as they are stay bit-identical to the base."""
    base_state, peft_state = case["base_state"], case["peft_state"]
    assert sorted(merged) == sorted(base_state), "merged checkpoint must hold exactly the base's tensor names"
    changed = 0
    for name, base_tensor in base_state.items():
        ours_t, peft_t = merged[name], peft_state[name]
        assert ours_t.shape == base_tensor.shape, name
        assert ours_t.dtype == base_tensor.dtype, name
        assert torch.allclose(ours_t, peft_t, atol=ATOL, rtol=RTOL), (
            f"{name}: max |ours - peft| = {(ours_t - peft_t).abs().max().item():.3g}")
        if torch.equal(peft_t, base_tensor):
            assert torch.equal(ours_t, base_tensor), f"{name} is untouched by the adapter but was changed"
        else:
            changed += 1
    assert changed > 0, "the adapter changed nothing: the fixture is broken"


def test_single_adapter_linear_merge_matches_peft_merge_and_unload(case: dict[str, Any], ours: Path) -> None:
    _assert_matches_peft(_load_checkpoint(ours), case)


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_merge_matches_peft_for_any_chunk_rows(
    case: dict[str, Any], chunk_rows: int, tmp_path: Path
) -> None:
    merged = _merge(case["base"], case["adapter"], tmp_path / "merged", chunk_rows=chunk_rows)
    _assert_matches_peft(_load_checkpoint(merged), case)


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_lora_merge_agrees_to_float32_rounding_for_every_chunk_rows(
    bases: dict[str, Path], tmp_path: Path, chunk_rows: int | None
) -> None:
    """Chunking changes nothing beyond float32 rounding: max |diff| ≤ 1e-6·max|τ| per tensor (SEMANTICS §5)."""
    adapter = build_adapter(bases["llama"], tmp_path / "adapter", "lora")
    reference = _load_checkpoint(_merge(bases["llama"], adapter, tmp_path / "whole", chunk_rows=None))
    merged = _load_checkpoint(_merge(bases["llama"], adapter, tmp_path / "chunked", chunk_rows=chunk_rows))
    base = load_file(bases["llama"] / "model.safetensors")
    for name, ref in reference.items():
        tau = (ref - base[name]).abs().max().item()
        assert (merged[name] - ref).abs().max().item() <= 1e-6 * max(tau, 1e-30) + 1e-12, name


def test_merged_checkpoint_gives_peft_logits_and_generates(case: dict[str, Any], ours: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ours)
    model = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    assert len(tokenizer) == model.config.vocab_size
    ours_logits = _logits(model, tokenizer)
    peft_logits = _logits(case["peft_model"], tokenizer)
    assert torch.allclose(ours_logits, peft_logits, atol=LOGITS_ATOL, rtol=0), (
        f"max |logits diff| = {(ours_logits - peft_logits).abs().max().item():.3g}")

    prompt = tokenizer(PROMPTS[:1], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    n_in = prompt["input_ids"].shape[1]
    assert n_in < out.shape[1] <= n_in + 5
    assert isinstance(tokenizer.decode(out[0, n_in:], skip_special_tokens=True), str)


def test_merged_checkpoint_carries_config_and_tokenizer_files(ours: Path, case: dict[str, Any]) -> None:
    base: Path = case["base"]
    assert json.loads((ours / "config.json").read_text())["model_type"] == json.loads(
        (base / "config.json").read_text())["model_type"]
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (ours / name).is_file(), name
