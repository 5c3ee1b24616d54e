"""`output.format: peft` (SEMANTICS §6, §3c): a merge written as one PEFT LoRA adapter.

What the adapter must be: loaded by PEFT (`PeftModel.from_pretrained`) with every written weight in place and
no missing/unexpected keys, its `merge_and_unload()` must equal the `format: checkpoint` output of the same config
(to the float32 rounding of the factor product) and give the same logits — for every adapter variant a merged
adapter can hold (plain, rsLoRA, rank/alpha patterns, lora_bias, embedding LoRA, modules_to_save, GPT-2 Conv1D),
for linear and task_arithmetic with signed weights, and for factored methods (iso_c, tsv_m, ties in core space).
`output.rank: k` must be the Eckart–Young truncation of the exact delta (checked against a dense float64 SVD) and
record the energy it kept; the randomized path (full-rank elementwise methods) must record its true error, never
beat the optimum, and be deterministic per seed. Refusals are one-line config errors that write nothing;
`output.dtype: bfloat16` halves the file at a measured, bounded error.

Note: an embedding-LoRA adapter as PEFT saves it by default also holds `embed_tokens.base_layer.weight` (a saved
full tensor, SEMANTICS §1), so its merged embedding is written whole under modules_to_save; the lora_embedding_A/B
layout is exercised by the same adapters saved without it (`factors_only`).
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evals.fixtures import build_adapter
from mergekit_lite import MergeConfig, MergeConfigError, merge
from tests.reference import load_checkpoint, plain_lora_task_vectors

PREFIX = "base_model.model."
DEMO_ADAPTERS = ("style", "math", "facts")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "mergekit_lite_config.yaml"}
#: a few token ids of the tiny character-level vocabulary (1 = <s>), two rows
TOKEN_IDS = torch.tensor([[1, 40, 41, 50, 60, 70, 17, 5, 33], [1, 9, 8, 7, 33, 44, 55, 66, 77]])
#: |PEFT's merge_and_unload − our checkpoint| per tensor ≤ DELTA_RTOL · max|ΔW| (the factors' product rounded in
#: float32) + ROUNDING_ULPS ulps of the merged value (W + ΔW is rounded once on either side)
DELTA_RTOL = 1e-5
ROUNDING_ULPS = 2
LOGITS_ATOL = 1e-4


# -------------------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------------------


def _config(base: Path, adapters: list[tuple[Path, float]], out: Path, method: str,
            parameters: dict[str, Any] | None = None, **output: Any) -> MergeConfig:
    data: dict[str, Any] = {
        "base_model": str(base),
        "method": method,
        "adapters": [{"path": str(path), "weight": weight} for path, weight in adapters],
        "output": {"path": str(out), **output},
    }
    if parameters:
        data["parameters"] = parameters
    return MergeConfig.from_dict(data)


def _demo_adapters(demo: Path, weights: list[float]) -> list[tuple[Path, float]]:
    return [(demo / "adapters" / name, w) for name, w in zip(DEMO_ADAPTERS, weights)]


def _run(config: MergeConfig) -> Any:
    return merge(config, device="cpu", progress=False)


def _both(base: Path, adapters: list[tuple[Path, float]], root: Path, method: str,
          parameters: dict[str, Any] | None = None, **output: Any) -> tuple[Path, Path, Any]:
    """(checkpoint folder, adapter folder, the adapter merge's result) of one config written both ways."""
    ckpt = _run(_config(base, adapters, root / "checkpoint", method, parameters))
    adapter = _run(_config(base, adapters, root / "adapter", method, parameters, format="peft", **output))
    assert ckpt.output_format == "checkpoint" and adapter.output_format == "peft"
    return Path(ckpt.output_dir), Path(adapter.output_dir), adapter


def _load_peft(base: Path, adapter: Path) -> dict[str, Any]:
    """Load base + adapter through PEFT once: the warnings it raised, its adapter state dict, the logits before
    merging, then `merge_and_unload()`'s state dict and logits."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with warnings.catch_warnings():
        # PEFT 0.21 flags every 1-D lora_B.bias as an "unsharded ZeRO-3 tensor" (its own lora_bias adapters too)
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        adapter_state = {k: v.detach().clone()
                         for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    with torch.no_grad():
        unmerged_logits = peft_model(input_ids=TOKEN_IDS).logits
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=TOKEN_IDS).logits
    return {
        "warnings": [str(w.message) for w in caught],
        "adapter_state": adapter_state,
        "unmerged_logits": unmerged_logits,
        "merged_state": {k: v.detach().clone() for k, v in merged.state_dict().items()},
        "merged_logits": merged_logits,
    }


def _checkpoint_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=TOKEN_IDS).logits


def _assert_peft_loaded_every_weight(adapter: Path, loaded: dict[str, Any]) -> None:
    """No missing-key warning (PEFT 0.21 warns only for those), and PEFT's adapter state dict is exactly the file
    (same keys, same values): every LoRA module got its written weights (none left at its init), and no written
    key was unexpected (PEFT drops those silently)."""
    key_warnings = [w for w in loaded["warnings"] if re.search(r"missing|unexpected", w, re.IGNORECASE)]
    assert not key_warnings, key_warnings
    written = load_file(adapter / "adapter_model.safetensors")
    state = loaded["adapter_state"]
    assert sorted(state) == sorted(written), (
        f"only in PEFT: {sorted(set(state) - set(written))}; only in the file: {sorted(set(written) - set(state))}")
    for key, tensor in written.items():
        assert torch.equal(state[key].to(tensor.dtype), tensor), key


def _assert_merged_equals_checkpoint(merged_state: dict[str, torch.Tensor], ckpt: Path, base: Path) -> int:
    """PEFT's merge_and_unload of the adapter equals our checkpoint output, tensor for tensor; tensors the merge
    leaves alone are the base's, bit for bit, on both sides. Returns how many tensors the merge changed."""
    checkpoint = load_checkpoint(ckpt)
    base_state = load_checkpoint(base)
    assert sorted(checkpoint) == sorted(base_state)
    changed = _assert_merged_equals_checkpoint_on(merged_state, checkpoint, base_state)
    assert changed > 0, "the merge changed nothing: the fixture is broken"
    return changed


def _assert_merged_equals_checkpoint_on(merged_state: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor],
                                        base_state: dict[str, torch.Tensor]) -> int:
    changed = 0
    for name, ours in checkpoint.items():
        peft_t = merged_state[name]
        assert peft_t.shape == ours.shape and peft_t.dtype == ours.dtype, name
        if torch.equal(ours, base_state[name]):
            assert torch.equal(peft_t, base_state[name]), f"{name}: untouched in the checkpoint, changed by PEFT"
            continue
        changed += 1
        delta = (ours.double() - base_state[name].double()).abs().max().item()
        ulp = torch.finfo(ours.dtype).eps * ours.double().abs().max().item()
        diff = (peft_t.double() - ours.double()).abs().max().item()
        assert diff <= DELTA_RTOL * delta + ROUNDING_ULPS * ulp, (
            f"{name}: max |PEFT merge of the adapter − checkpoint| = {diff:.3g}, max |ΔW| = {delta:.3g}")
    return changed


def _assert_logits_close(expected: torch.Tensor, got: torch.Tensor, what: str) -> None:
    diff = (expected - got).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{what}: max |logits diff| = {diff:.3g}"


def _assert_adapter_folder(adapter: Path) -> None:
    """The four files, a card with PEFT front matter, a LoraConfig at scale 1 and the resolved config."""
    assert {p.name for p in adapter.iterdir()} == ADAPTER_FILES
    card = (adapter / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft", front
    assert front["base_model_relation"] == "adapter", front
    assert "lora" in front["tags"], front
    lora = json.loads((adapter / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["lora_alpha"] == lora["r"] and not lora["use_rslora"]
    assert lora["alpha_pattern"] == lora["rank_pattern"]
    assert not lora["use_dora"]
    resolved = yaml.safe_load((adapter / "mergekit_lite_config.yaml").read_text())
    assert resolved["output"]["format"] == "peft"


def _card_rows(adapter: Path) -> dict[str, tuple[int, float, float]]:
    """The card's compression table: tensor -> (rank, kept ‖ΔW‖²_F, relative error)."""
    rows = {}
    for line in (adapter / "README.md").read_text().splitlines():
        match = re.fullmatch(r"\| (\S+\.weight) \| (\d+) \| ([0-9.]+) \| ([0-9.e+-]+) \|", line.strip())
        if match:
            rows[match[1]] = (int(match[2]), float(match[3]), float(match[4]))
    return rows


def _factor_products(adapter: Path) -> dict[str, torch.Tensor]:
    """B·A in float64 for each Linear LoRA module of a (Llama) adapter, keyed by base tensor name (scale 1)."""
    lora = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    products = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX): -len(".lora_A.weight")]
            rank = lora["rank_pattern"].get(module, lora["r"])
            scale = lora["alpha_pattern"].get(module, lora["lora_alpha"]) / rank
            assert a.shape[0] == rank, key
            products[f"{module}.weight"] = scale * (tensors[f"{PREFIX}{module}.lora_B.weight"].double() @ a.double())
    return products


def _exact_deltas(demo: Path, coefficients: list[float]) -> dict[str, torch.Tensor]:
    """Σ cᵢτᵢ in float64 from the demo's raw adapter files."""
    total: dict[str, torch.Tensor] = {}
    for name, coef in zip(DEMO_ADAPTERS, coefficients):
        for tensor, tau in plain_lora_task_vectors(demo / "adapters" / name).items():
            total[tensor] = total.get(tensor, torch.zeros_like(tau)) + coef * tau
    return total


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (the file less its 8-byte length and JSON header)."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


# -------------------------------------------------------------------------------------------------------------
# 1. Every adapter variant, linear and task_arithmetic with signed weights: adapter ≡ checkpoint
# -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    arch: str  # key into the `bases` fixture
    variant: str
    #: drop the saved full tensors from the input files (PEFT's `save_embedding_layers=False`): an embedding
    #: adapter as PEFT saves it by default also carries `embed_tokens.base_layer.weight`, a saved full tensor
    factors_only: bool = False

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.variant}" + ("-factors_only" if self.factors_only else "")


VARIANT_CASES = [Variant("llama", "lora"), Variant("llama", "rslora"), Variant("llama", "pattern"),
                 Variant("llama_bias", "bias"), Variant("llama", "embedding"), Variant("llama", "embedding", True),
                 Variant("llama", "modules_to_save"), Variant("gpt2", "lora")]
#: method -> (global parameters, the two adapters' signed weights)
LINEAR_METHODS: dict[str, tuple[dict[str, Any], list[float]]] = {
    "linear": ({}, [1.0, -0.6]),
    "task_arithmetic": ({"lambda": 0.7}, [1.0, -0.6]),
}
PAIRS = [(v, m) for v in VARIANT_CASES for m in LINEAR_METHODS]


@pytest.fixture(scope="module")
def inputs(bases: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Callable[[Variant], tuple[Path, list[Path]]]:
    """variant -> (its base, two adapters of it: seeds 1 and 2, ranks 4 and 3), each built once."""
    built: dict[Variant, tuple[Path, list[Path]]] = {}

    def get(variant: Variant) -> tuple[Path, list[Path]]:
        if variant not in built:
            root, base = tmp_path_factory.mktemp(f"inputs-{variant.id}"), bases[variant.arch]
            adapters = [build_adapter(base, root / f"in{seed}", variant.variant, seed=seed, r=r)
                        for seed, r in ((1, 4), (2, 3))]
            if variant.factors_only:
                for folder in adapters:
                    tensors = load_file(folder / "adapter_model.safetensors")
                    save_file({k: v for k, v in tensors.items() if ".lora_" in k},
                              folder / "adapter_model.safetensors", metadata={"format": "pt"})
            built[variant] = (base, adapters)
        return built[variant]

    return get


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{v.id}-{m}" for v, m in PAIRS])
def pair(request: pytest.FixtureRequest, inputs: Callable[[Variant], tuple[Path, list[Path]]],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two adapters of one variant merged with signed weights, as a checkpoint and as an adapter, and the adapter
    loaded through PEFT."""
    variant, method = request.param
    base, adapters = inputs(variant)
    parameters, weights = LINEAR_METHODS[method]
    root = tmp_path_factory.mktemp(f"{variant.id}-{method}")
    ckpt, adapter, result = _both(base, list(zip(adapters, weights)), root, method, parameters)
    return {"base": base, "checkpoint": ckpt, "adapter": adapter, "result": result,
            "loaded": _load_peft(base, adapter)}


def test_adapter_output_is_a_peft_folder_with_an_adapter_card(pair: dict[str, Any]) -> None:
    _assert_adapter_folder(pair["adapter"])
    assert pair["result"].notes == "", "an exact adapter has nothing compressed to report"


def test_peft_loads_every_written_weight_without_missing_or_unexpected_keys(pair: dict[str, Any]) -> None:
    _assert_peft_loaded_every_weight(pair["adapter"], pair["loaded"])


def test_merge_and_unload_of_the_adapter_equals_the_checkpoint_output(pair: dict[str, Any]) -> None:
    _assert_merged_equals_checkpoint(pair["loaded"]["merged_state"], pair["checkpoint"], pair["base"])


def test_adapter_gives_the_checkpoint_logits_merged_and_unmerged(pair: dict[str, Any]) -> None:
    expected = _checkpoint_logits(pair["checkpoint"])
    _assert_logits_close(expected, pair["loaded"]["merged_logits"], "merge_and_unload")
    _assert_logits_close(expected, pair["loaded"]["unmerged_logits"], "PeftModel forward")


def test_variant_specific_layout(pair: dict[str, Any]) -> None:
    """Each variant lands where PEFT expects it: lora_bias → lora_B.bias; a saved full tensor in an input →
    its module under modules_to_save with the full merged tensor; embedding factors → lora_embedding_A (k×vocab)
    / lora_embedding_B (dim×k); Conv1D → fan_in_fan_out; different ranks per module → rank_pattern."""
    adapter: Path = pair["adapter"]
    lora = json.loads((adapter / "adapter_config.json").read_text())
    written = load_file(adapter / "adapter_model.safetensors")
    inputs = [Path(a["path"]) for a in yaml.safe_load((adapter / "mergekit_lite_config.yaml").read_text())["adapters"]]
    first = json.loads((inputs[0] / "adapter_config.json").read_text())
    input_keys = {k[len(PREFIX):] for folder in inputs for k in load_file(folder / "adapter_model.safetensors")}
    saved = {re.sub(r"(\.base_layer)?\.weight$", "", k) for k in input_keys if ".lora_" not in k}
    factored_embedding = {k.split(".lora_embedding_")[0] for k in input_keys if ".lora_embedding_" in k} - saved

    assert lora["lora_bias"] == bool(first.get("lora_bias"))
    assert any(k.endswith(".lora_B.bias") for k in written) == bool(first.get("lora_bias"))
    assert lora["fan_in_fan_out"] == bool(first.get("fan_in_fan_out"))
    assert lora["modules_to_save"] == (sorted(saved) or None), lora["modules_to_save"]
    checkpoint = load_checkpoint(pair["checkpoint"])
    for module in saved:
        assert torch.equal(written[f"{PREFIX}{module}.weight"], checkpoint[f"{module}.weight"]), module
    embedding_modules = {k[len(PREFIX):].split(".lora_embedding_")[0] for k in written if ".lora_embedding_" in k}
    assert embedding_modules == factored_embedding
    for module in embedding_modules:
        vocab, dim = checkpoint[f"{module}.weight"].shape
        rank = lora["rank_pattern"].get(module, lora["r"])
        assert written[f"{PREFIX}{module}.lora_embedding_A"].shape == (rank, vocab), module
        assert written[f"{PREFIX}{module}.lora_embedding_B"].shape == (dim, rank), module
    assert bool(lora["rank_pattern"]) == bool(first.get("rank_pattern")), lora["rank_pattern"]
    for module in lora["target_modules"]:
        rank = lora["rank_pattern"].get(module, lora["r"])
        a_key = f"{PREFIX}{module}.lora_A.weight"
        assert written.get(a_key, written.get(f"{PREFIX}{module}.lora_embedding_A")).shape[0] == rank, module


# -------------------------------------------------------------------------------------------------------------
# 1b. Every variant compressed (output.rank): lora tensors at the recorded error, bias shifts and saved tensors exact
# -------------------------------------------------------------------------------------------------------------

COMPRESSED_RANK = 5
#: method -> (global parameters, whether the rank-k factors must be the optimal ones: Eckart–Young on the core)
COMPRESSED_METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "task_arithmetic": ({"lambda": 0.7}, True),
    "ties": ({"density": 0.5}, False),
}
COMPRESSED = [(v, m) for v in VARIANT_CASES for m in COMPRESSED_METHODS]


@pytest.fixture(scope="module", params=COMPRESSED, ids=[f"{v.id}-{m}" for v, m in COMPRESSED])
def compressed(request: pytest.FixtureRequest, inputs: Callable[[Variant], tuple[Path, list[Path]]],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    variant, method = request.param
    base, adapters = inputs(variant)
    parameters, optimal = COMPRESSED_METHODS[method]
    root = tmp_path_factory.mktemp(f"rank-{variant.id}-{method}")
    ckpt, adapter, result = _both(base, list(zip(adapters, [1.0, -0.6])), root, method, parameters,
                                  rank=COMPRESSED_RANK)
    return {"base": base, "checkpoint": ckpt, "adapter": adapter, "result": result, "optimal": optimal,
            "variant": variant, "loaded": _load_peft(base, adapter)}


def test_compressed_adapter_of_every_variant_merges_to_the_recorded_error(compressed: dict[str, Any]) -> None:
    """Through PEFT's merge_and_unload, each factored tensor's ‖Δ_checkpoint − Δ_adapter‖_F / ‖Δ_checkpoint‖_F
    is the error the card records (never below the truncated-SVD optimum; equal to it for a linear method); bias
    shifts (lora_B.bias) and saved tensors (modules_to_save) are not compressed and stay exact. Rank 5 is below
    every factored tensor's exact rank but the pattern variant's q_proj (2 + 2), so that one keeps its rank 4
    through rank_pattern."""
    adapter, loaded = compressed["adapter"], compressed["loaded"]
    _assert_adapter_folder(adapter)
    _assert_peft_loaded_every_weight(adapter, loaded)
    rows = _card_rows(adapter)
    checkpoint, base = load_checkpoint(compressed["checkpoint"]), load_checkpoint(compressed["base"])
    lora = json.loads((adapter / "adapter_config.json").read_text())
    saved = {f"{m}.weight" for m in lora["modules_to_save"] or []}
    factored = {n for n, t in checkpoint.items() if t.dim() == 2 and n not in saved and not torch.equal(t, base[n])}
    assert sorted(rows) == sorted(factored), "the card's table must list exactly the factored tensors"
    exact_only = {}
    for name, ours in checkpoint.items():
        if name not in rows:
            exact_only[name] = ours
            continue
        card_rank, card_kept, card_error = rows[name]
        assert card_rank <= COMPRESSED_RANK
        delta = ours.double() - base[name].double()
        norm = torch.linalg.matrix_norm(delta).item()
        measured = torch.linalg.matrix_norm(delta - (loaded["merged_state"][name].double() - base[name].double()))
        measured = measured.item() / norm
        s = torch.linalg.svdvals(delta)
        optimal = math.sqrt(float((s[card_rank:] ** 2).sum())) / norm
        recorded = math.sqrt(max(0.0, 1.0 - card_kept))
        assert card_error == pytest.approx(recorded, rel=5e-3, abs=1e-6), name
        assert abs(recorded - measured) <= 1e-4, f"{name}: recorded error {recorded:.6f}, measured {measured:.6f}"
        assert recorded >= optimal - 1e-5, f"{name}: recorded {recorded:.6f} below the optimum {optimal:.6f}"
        if compressed["optimal"]:
            assert recorded <= optimal + 1e-5, f"{name}: recorded {recorded:.6f} above the optimum {optimal:.6f}"
    merged_exact = {n: t for n, t in loaded["merged_state"].items() if n in exact_only}
    _assert_merged_equals_checkpoint_on(merged_exact, exact_only, base)
    assert compressed["result"].notes.startswith(f"rank {COMPRESSED_RANK}: kept ")
    ranks = {rows[n][0] for n in rows}
    assert max(ranks) == COMPRESSED_RANK and bool(lora["rank_pattern"]) == (len(ranks) > 1), lora["rank_pattern"]
    if compressed["variant"].variant == "pattern" and compressed["optimal"]:
        assert ranks == {4, COMPRESSED_RANK}, ranks


# -------------------------------------------------------------------------------------------------------------
# 2. Factored methods (SEMANTICS §3c) without rank: their own factors, exact
# -------------------------------------------------------------------------------------------------------------

FACTORED = {
    "iso_c": ("iso_c", {}),
    "tsv_m": ("tsv_m", {}),
    "ties_core": ("ties", {"space": "core", "density": 0.5}),
}


@pytest.fixture(scope="module", params=sorted(FACTORED))
def factored(request: pytest.FixtureRequest, demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    method, parameters = FACTORED[request.param]
    root = tmp_path_factory.mktemp(f"factored-{request.param}")
    ckpt, adapter, result = _both(demo / "base", _demo_adapters(demo, [1.0, -0.6, 0.5]), root, method, parameters)
    return {"base": demo / "base", "checkpoint": ckpt, "adapter": adapter, "result": result,
            "loaded": _load_peft(demo / "base", adapter)}


def test_factored_method_adapter_is_exact_without_rank(factored: dict[str, Any]) -> None:
    _assert_adapter_folder(factored["adapter"])
    _assert_peft_loaded_every_weight(factored["adapter"], factored["loaded"])
    _assert_merged_equals_checkpoint(factored["loaded"]["merged_state"], factored["checkpoint"], factored["base"])
    expected = _checkpoint_logits(factored["checkpoint"])
    _assert_logits_close(expected, factored["loaded"]["merged_logits"], "merge_and_unload")
    _assert_logits_close(expected, factored["loaded"]["unmerged_logits"], "PeftModel forward")
    assert factored["result"].notes == ""


def test_a_factored_adapter_computes_each_tensors_factors_once(demo: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """layout needs the factors' width for the ranks; produce writes the same factors instead of computing
    them again (same bytes as before: the rest of this module's tests)."""
    from mergekit_lite.engine.loop import MergeEngine

    calls: list[str] = []
    tensor_delta = MergeEngine.tensor_delta
    monkeypatch.setattr(MergeEngine, "tensor_delta", lambda self, s: calls.append(s.name) or tensor_delta(self, s))
    result = _run(_config(demo / "base", _demo_adapters(demo, [1.0, -0.6, 0.5]), tmp_path / "adapter", "tsv_m",
                          format="peft"))
    written = _factor_products(Path(result.output_dir))
    assert len(written) == 14 and sorted(calls) == sorted(set(calls)) and set(calls) == set(written)


# -------------------------------------------------------------------------------------------------------------
# 3. output.rank on a linear method: Eckart–Young against a dense float64 SVD, kept energy recorded
# -------------------------------------------------------------------------------------------------------------

TA_WEIGHTS, TA_LAMBDA = [1.0, -0.6, 0.5], 0.7


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_k_task_arithmetic_is_the_dense_truncated_svd_and_records_kept_energy(
        demo: Path, tmp_path: Path, rank: int) -> None:
    config = _config(demo / "base", _demo_adapters(demo, TA_WEIGHTS), tmp_path / "adapter", "task_arithmetic",
                     {"lambda": TA_LAMBDA}, format="peft", rank=rank)
    result = _run(config)
    adapter = Path(result.output_dir)
    _assert_adapter_folder(adapter)
    lora = json.loads((adapter / "adapter_config.json").read_text())
    assert lora["r"] == rank and lora["rank_pattern"] == {}
    exact = _exact_deltas(demo, [TA_LAMBDA * w for w in TA_WEIGHTS])
    products = _factor_products(adapter)
    rows = _card_rows(adapter)
    assert sorted(products) == sorted(exact) == sorted(rows)
    kept_by_tensor = {}
    for name, delta in exact.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        assert s[rank - 1] - s[rank] > 1e-3 * s[0], f"{name}: σ_k ≈ σ_k+1, the top-k subspace is ill defined"
        truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
        diff = (products[name] - truncated).abs().max().item()
        assert diff <= 1e-5 * delta.abs().max().item(), f"{name}: max |B·A − dense top-{rank} SVD| = {diff:.3g}"
        kept = float((s[:rank] ** 2).sum() / (s**2).sum())
        kept_by_tensor[name] = kept
        card_rank, card_kept, card_error = rows[name]
        assert card_rank == rank
        assert abs(card_kept - kept) <= 1e-6, f"{name}: card kept {card_kept} vs dense SVD {kept:.8f}"
        assert card_error == pytest.approx(math.sqrt(1 - kept), rel=5e-3, abs=1e-6), name
    mean = sum(kept_by_tensor.values()) / len(kept_by_tensor)
    worst = min(kept_by_tensor, key=kept_by_tensor.__getitem__)
    overall = re.search(r"kept ([0-9.]+)% of ‖ΔW‖²_F overall; worst tensor (\S+) ([0-9.]+)%", result.notes)
    assert overall, result.notes
    assert float(overall[1]) == pytest.approx(100 * mean, abs=0.006), result.notes
    assert overall[2] == worst and float(overall[3]) == pytest.approx(100 * kept_by_tensor[worst], abs=0.006)
    assert result.notes in result.summary()
    print(f"rank {rank}: kept energy per tensor on the demo: "
          + ", ".join(f"{n.removeprefix('model.layers.')}={k:.4f}" for n, k in sorted(kept_by_tensor.items()))
          + f"; mean {mean:.4f}")


def test_rank_at_or_above_the_exact_rank_keeps_everything(demo: Path, tmp_path: Path) -> None:
    """k ≥ Σ rᵢ (12 on the demo) writes rank Σ rᵢ and keeps the whole delta."""
    config = _config(demo / "base", _demo_adapters(demo, TA_WEIGHTS), tmp_path / "adapter", "task_arithmetic",
                     {"lambda": TA_LAMBDA}, format="peft", rank=50)
    adapter = Path(_run(config).output_dir)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 12
    exact = _exact_deltas(demo, [TA_LAMBDA * w for w in TA_WEIGHTS])
    for name, product in _factor_products(adapter).items():
        diff = (product - exact[name]).abs().max().item()
        assert diff <= 1e-5 * exact[name].abs().max().item(), name
    assert all(kept >= 1 - 1e-6 for _, kept, _ in _card_rows(adapter).values())


def test_rank_k_on_iso_c_keeps_k_over_rho_of_the_energy(demo: Path, tmp_path: Path) -> None:
    """iso_c's delta σ̄·U Vᵀ has ρ equal singular values (ρ = Σ rᵢ = 12 on the demo), so any rank-k truncation
    keeps exactly k/ρ of ‖ΔW‖²_F: the card must say so and the written factors must leave √(1 − k/ρ) of the
    checkpoint's delta."""
    rank, rho = 5, 12
    adapters = _demo_adapters(demo, TA_WEIGHTS)
    ckpt = _run(_config(demo / "base", adapters, tmp_path / "checkpoint", "iso_c"))
    result = _run(_config(demo / "base", adapters, tmp_path / "adapter", "iso_c", format="peft", rank=rank))
    adapter = Path(result.output_dir)
    merged, base = load_checkpoint(Path(ckpt.output_dir)), load_checkpoint(demo / "base")
    rows, products = _card_rows(adapter), _factor_products(adapter)
    assert sorted(rows) == sorted(products) and len(rows) == 14
    for name, product in products.items():
        card_rank, card_kept, _ = rows[name]
        assert card_rank == rank and abs(card_kept - rank / rho) <= 1e-6, f"{name}: kept {card_kept}"
        delta = merged[name].double() - base[name].double()
        error = (torch.linalg.matrix_norm(delta - product) / torch.linalg.matrix_norm(delta)).item()
        assert abs(error - math.sqrt(1 - rank / rho)) <= 1e-4, f"{name}: measured error {error:.6f}"
    assert f"kept {100 * rank / rho:.2f}%" in result.notes, result.notes


# -------------------------------------------------------------------------------------------------------------
# 4. The randomized path (full-rank elementwise methods): recorded error true, ≥ optimal, deterministic
# -------------------------------------------------------------------------------------------------------------

RANDOMIZED_RANK = 4


def _ties_adapter(demo: Path, out: Path, seed: int = 0) -> Any:
    data = {
        "base_model": str(demo / "base"), "method": "ties", "parameters": {"density": 0.5}, "seed": seed,
        "adapters": [{"path": str(p), "weight": w} for p, w in _demo_adapters(demo, [1.0, -0.6, 0.5])],
        "output": {"path": str(out), "format": "peft", "rank": RANDOMIZED_RANK, "dtype": "float32"},
    }
    return _run(MergeConfig.from_dict(data))


def test_randomized_rank_k_records_its_true_error_which_is_never_below_optimal(demo: Path, tmp_path: Path) -> None:
    result = _ties_adapter(demo, tmp_path / "adapter")
    adapter = Path(result.output_dir)
    _assert_adapter_folder(adapter)
    ckpt = _run(_config(demo / "base", _demo_adapters(demo, [1.0, -0.6, 0.5]), tmp_path / "checkpoint", "ties",
                        {"density": 0.5}, dtype="float32"))
    merged, base = load_checkpoint(Path(ckpt.output_dir)), load_checkpoint(demo / "base")
    products, rows = _factor_products(adapter), _card_rows(adapter)
    assert sorted(products) == sorted(rows) and products
    ratios = []
    for name, product in products.items():
        delta = merged[name].double() - base[name].double()
        norm = torch.linalg.matrix_norm(delta).item()
        measured = torch.linalg.matrix_norm(delta - product).item() / norm
        s = torch.linalg.svdvals(delta)
        optimal = math.sqrt(float((s[RANDOMIZED_RANK:] ** 2).sum())) / norm
        card_rank, card_kept, card_error = rows[name]
        recorded = math.sqrt(max(0.0, 1.0 - card_kept))  # the 6-decimal kept column: error to ~1e-6
        assert card_rank == RANDOMIZED_RANK
        assert card_error == pytest.approx(recorded, rel=5e-3), name
        assert abs(recorded - measured) <= 1e-4, f"{name}: recorded error {recorded:.6f}, measured {measured:.6f}"
        assert recorded >= optimal - 1e-6, f"{name}: recorded {recorded:.6f} below the optimum {optimal:.6f}"
        ratios.append(measured / optimal)
    print(f"ties density 0.5, rank {RANDOMIZED_RANK}: randomized / optimal error ratio "
          f"min {min(ratios):.5f} max {max(ratios):.5f}; notes: {result.notes}")
    assert max(ratios) < 1.05, f"randomized SVD error up to {max(ratios):.4f}× the optimum (OVERSAMPLE 8, 4 passes)"


def test_randomized_rank_k_is_deterministic_per_seed_and_leaves_the_global_rng_alone(
        demo: Path, tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    first = (Path(_ties_adapter(demo, tmp_path / "a").output_dir) / "adapter_model.safetensors").read_bytes()
    second = (Path(_ties_adapter(demo, tmp_path / "b").output_dir) / "adapter_model.safetensors").read_bytes()
    assert torch.equal(torch.random.get_rng_state(), state), "the merge moved the caller's torch RNG"
    assert first == second, "the same seed gave different adapter bytes"
    other = (Path(_ties_adapter(demo, tmp_path / "c", seed=1).output_dir) / "adapter_model.safetensors").read_bytes()
    assert other != first, "the randomized SVD ignores the config's seed"


@pytest.mark.parametrize("method, parameters, output", [
    ("ties", {"density": 0.5}, {"rank": RANDOMIZED_RANK}),
    ("task_arithmetic", {"lambda": TA_LAMBDA}, {"rank": 3}),
    ("tsv_m", {}, {}),
], ids=["ties-randomized", "task_arithmetic-rank", "tsv_m-exact"])
def test_adapter_bytes_do_not_depend_on_chunk_rows_or_workers(
        demo: Path, tmp_path: Path, method: str, parameters: dict[str, Any], output: dict[str, Any]) -> None:
    """SEMANTICS §3c/§5: chunk size and worker count change no byte — of the adapter's factors either."""
    written = []
    for i, options in enumerate([{}, {"chunk_rows": 1}, {"chunk_rows": 5, "workers": 3}]):
        config = _config(demo / "base", _demo_adapters(demo, TA_WEIGHTS), tmp_path / f"out{i}", method, parameters,
                         format="peft", **output)
        folder = Path(merge(config, device="cpu", progress=False, **options).output_dir)
        written.append((folder / "adapter_model.safetensors").read_bytes())
    assert written[1] == written[0] and written[2] == written[0]


# -------------------------------------------------------------------------------------------------------------
# 5. Refusals: one-line MergeConfigError, nothing written
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dora_adapter(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(demo / "base", tmp_path_factory.mktemp("dora") / "dora", "dora", seed=5)


REFUSALS = {
    "ties_without_rank": ("ties", {"density": 0.5}, {"format": "peft"}, False, r"rank"),
    "dora_adapter": ("task_arithmetic", {}, {"format": "peft"}, True, r"DoRA"),
    "rank_on_a_checkpoint": ("task_arithmetic", {}, {"format": "checkpoint", "rank": 4}, False, r"rank"),
    "rank_zero": ("task_arithmetic", {}, {"format": "peft", "rank": 0}, False, r"rank"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_config_errors_that_write_nothing(
        case: str, demo: Path, dora_adapter: Path, tmp_path: Path) -> None:
    method, parameters, output, with_dora, pattern = REFUSALS[case]
    adapters = _demo_adapters(demo, [1.0, -0.6])
    if with_dora:
        adapters.append((dora_adapter, 0.5))
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    with pytest.raises(MergeConfigError) as caught:
        _run(_config(demo / "base", adapters, out_root / "merged", method, parameters, **output))
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    assert re.search(pattern, message), message
    assert list(out_root.iterdir()) == [], f"a refused merge wrote {list(out_root.iterdir())}"


# -------------------------------------------------------------------------------------------------------------
# 6. output.dtype: bfloat16 halves the file at a bounded error
# -------------------------------------------------------------------------------------------------------------


def test_bfloat16_factors_halve_the_adapter_at_under_one_percent_error(demo: Path, tmp_path: Path) -> None:
    files, products = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = _config(demo / "base", _demo_adapters(demo, TA_WEIGHTS), tmp_path / dtype, "task_arithmetic",
                         {"lambda": TA_LAMBDA}, format="peft", dtype=dtype)
        folder = Path(_run(config).output_dir)
        files[dtype] = folder / "adapter_model.safetensors"
        written = load_file(files[dtype])
        expected = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        assert {t.dtype for t in written.values()} == {expected}, dtype
        products[dtype] = _factor_products(folder)
    assert _data_bytes(files["bfloat16"]) * 2 == _data_bytes(files["float32"])
    size_ratio = files["bfloat16"].stat().st_size / files["float32"].stat().st_size
    exact = _exact_deltas(demo, [TA_LAMBDA * w for w in TA_WEIGHTS])
    frobenius = max((torch.linalg.matrix_norm(products["bfloat16"][n] - d) / torch.linalg.matrix_norm(d)).item()
                    for n, d in exact.items())
    entrywise = max((products["bfloat16"][n] - d).abs().max().item() / d.abs().max().item() for n, d in exact.items())
    f32 = max((products["float32"][n] - d).abs().max().item() / d.abs().max().item() for n, d in exact.items())
    report = (f"bf16 adapter: file size ratio {size_ratio:.4f}; max relative error vs the exact delta "
              f"{frobenius:.3e} (Frobenius), {entrywise:.3e} (max entry / max |ΔW|); float32: {f32:.3e}")
    print(report)
    assert size_ratio < 0.55, report
    assert frobenius < 1e-2 and entrywise < 1e-2, report
    assert f32 < 1e-5, report


# -------------------------------------------------------------------------------------------------------------
# Found while writing these tests, now fixed (the CUDA one is checked where a GPU is present)
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, parameters, output", [
    ("task_arithmetic", {}, {}),
    ("ties", {"density": 0.5}, {"rank": 2}),
], ids=["task_arithmetic", "ties-rank"])
def test_all_zero_weights_are_a_config_error_for_an_adapter_output_and_write_nothing(
        demo: Path, tmp_path: Path, method: str, parameters: dict[str, Any], output: dict[str, Any]) -> None:
    """No adapter changes any tensor, so there is no adapter to write: one line naming why, nothing on disk
    (the merge would be the base itself; a checkpoint output writes it)."""
    out_root = tmp_path / "outputs"
    out_root.mkdir()
    config = _config(demo / "base", _demo_adapters(demo, [0.0, 0.0, 0.0]), out_root / "adapter", method, parameters,
                     format="peft", **output)
    with pytest.raises(MergeConfigError, match="no adapter changes any tensor") as caught:
        _run(config)
    assert "\n" not in str(caught.value).strip() and list(out_root.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the caller's CUDA RNG state")
def test_randomized_rank_k_leaves_the_cuda_rng_alone(demo: Path, tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(12345)
    before = torch.cuda.get_rng_state()
    data = {
        "base_model": str(demo / "base"), "method": "ties", "parameters": {"density": 0.5},
        "adapters": [{"path": str(p), "weight": w} for p, w in _demo_adapters(demo, [1.0, -0.6, 0.5])],
        "output": {"path": str(tmp_path / "adapter"), "format": "peft", "rank": RANDOMIZED_RANK},
    }
    merge(MergeConfig.from_dict(data), device="cuda", progress=False)
    assert torch.equal(torch.cuda.get_rng_state(), before), "the merge moved the caller's CUDA RNG"


# -- merge verify on adapter outputs ----------------------------------------------------------------------------


def test_merge_verify_checks_an_adapter_output_and_its_logits_against_the_checkpoint(demo: Path,
                                                                                      tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_lite.cli import main

    adapters = _demo_adapters(demo, [1.0, -0.6, 0.5])
    outputs = {}
    for fmt in ("checkpoint", "peft"):
        config = _config(demo / "base", adapters, tmp_path / fmt, "task_arithmetic", {"lambda": 0.7}, format=fmt)
        outputs[fmt] = Path(_run(config).output_dir)
    runner = CliRunner()
    result = runner.invoke(main, ["verify", str(outputs["peft"]), "--no-progress", "--base", str(demo / "base"),
                                  "--checkpoint", str(outputs["checkpoint"])])
    assert result.exit_code == 0, result.output
    assert "adapter_config.json ok" in result.output and "logits      ok" in result.output
    weights = outputs["peft"] / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    result = runner.invoke(main, ["verify", str(outputs["peft"]), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "adapter_config.json FAIL" in result.output and "has no lora_B.weight" in result.output


def test_merge_eval_scores_an_adapter_output_as_the_base_with_the_adapter_through_peft(demo: Path,
                                                                                        tmp_path: Path) -> None:
    """No merge to disk: the report's merge row is the base with the merged adapter applied by PEFT (the
    lm-eval run itself is covered by tests/test_eval.py; here, which model each row loads)."""
    from mergekit_lite.evaluation.rows import plan_models

    config = _config(demo / "base", _demo_adapters(demo, [1.0, -0.6, 0.5]), tmp_path / "adapter", "task_arithmetic",
                     {}, format="peft")
    out = Path(_run(config).output_dir)
    models, references = plan_models([config], [out], [out])
    merged = next(m for m in models if m.kind == "merge")
    assert merged.path == (demo / "base").resolve() and merged.adapter == out.resolve()
    assert merged.model_args("cpu")["peft"] == str(out.resolve())
    assert [m.kind for m in models if m.adapter == out.resolve()] == ["merge"]  # the plain folder is the same row


def test_merge_publish_accepts_an_adapter_output_and_refuses_an_incomplete_one(demo: Path, tmp_path: Path) -> None:
    from mergekit_lite.hub.publish import UnpublishableError, check_folder

    config = _config(demo / "base", _demo_adapters(demo, [1.0, 0.5, 0.5]), tmp_path / "adapter", "task_arithmetic",
                     {}, format="peft")
    out = Path(_run(config).output_dir)
    names = {f.path for f in check_folder(out)}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    (out / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(UnpublishableError, match="adapter_model.safetensors"):
        check_folder(out)


def test_dry_run_says_how_an_adapter_output_is_written(demo: Path, tmp_path: Path) -> None:
    from mergekit_lite import describe_plan

    adapters = _demo_adapters(demo, [1.0, 0.5, 0.5])
    exact = _config(demo / "base", adapters, tmp_path / "a", "task_arithmetic", {}, format="peft")
    ranked = _config(demo / "base", adapters, tmp_path / "b", "ties", {"density": 0.5}, format="peft", rank=2)
    assert "as one PEFT adapter, exact factors" in describe_plan(exact, device="cpu")
    text = describe_plan(ranked, device="cpu")
    assert "randomized SVD" in text and "one tensor's delta held at a time" in text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
