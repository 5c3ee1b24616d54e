"""Sparsifiers are strategies the methods own: the engine asks them and never compares names. A test-only
sparsifier, one class, runs through the whole engine with the same bytes for any chunking, workers and kernels;
the new methods are listed by `merge methods`, accepted by `merge sweep` and recorded on the card."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from mergekit_lite import merge
from mergekit_lite.cli import main
from mergekit_lite.engine import kernels
from mergekit_lite.methods import REGISTRY, ElementwisePhase, MergeMethod, Param, register
from mergekit_lite.methods.sparsifiers import Cut, Sparsifier
from mergekit_lite.methods.sparsifying import sum_consensus

from .configs import DEMO_ADAPTERS, demo_config
from .reference import load_checkpoint, plain_lora_task_vectors

REPO = Path(__file__).resolve().parents[1]
NEW_METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock")


class KeepPositive(Sparsifier):
    """Keep the positive entries, scaled by 2 (no selection pass; a magnitude cut cannot say it, so in place)."""

    name = "keep_positive_for_tests"

    def scale(self, weight: float, own: Mapping[str, Any]) -> float:
        return 2.0 * float(weight)

    def cut(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> torch.Tensor | None:
        return tau.clamp(min=0.0)

    def cut_in_place(self, tau: torch.Tensor, flat_start: int, cut: Cut) -> float:
        tau.clamp_(min=0.0)
        return -1.0


@pytest.fixture
def positive_method() -> Iterator[MergeMethod]:
    method = register(MergeMethod(
        name="keep_positive_for_tests", display_name="Keep positive (test only)", paper_url=None,
        summary="τ = λ · Σ 2wᵢ relu(τᵢ)", params=(Param("lambda", 1.0, float, "scale"),),
        phase=ElementwisePhase(sum_consensus, sparsifier=KeepPositive(), kernel="sum")))
    yield method
    del REGISTRY[method.name]


def test_a_new_sparsifier_is_one_class_and_runs_exactly_through_the_engine(
        positive_method: MergeMethod, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = [1.0, -0.5, 2.0]
    config = demo_config(demo, tmp_path / "whole", positive_method.name, weights, parameters={"lambda": 0.5})
    whole = merge(config, device="cpu", workers=1, progress=False).output_dir
    merged, base = load_checkpoint(whole), load_checkpoint(demo / "base")
    taus = [plain_lora_task_vectors(demo / "adapters" / name) for name in DEMO_ADAPTERS]
    for name, tensor in merged.items():
        if name in taus[0]:
            expected = base[name].double() + 0.5 * sum(2 * w * t[name].clamp(min=0) for t, w in zip(taus, weights))
            torch.testing.assert_close(tensor.double(), expected, atol=1e-5, rtol=1e-5, msg=name)
    chunked = merge(config, out=tmp_path / "chunked", device="cpu", chunk_rows=3, workers=3, progress=False).output_dir
    monkeypatch.setenv(kernels.ENV, "torch")
    plain = merge(config, out=tmp_path / "torch", device="cpu", chunk_rows=5, progress=False).output_dir
    expected_bytes = (whole / "model.safetensors").read_bytes()
    assert (chunked / "model.safetensors").read_bytes() == expected_bytes
    assert (plain / "model.safetensors").read_bytes() == expected_bytes


def test_the_engine_never_compares_sparsifier_names_and_methods_never_import_the_engine() -> None:
    for path in (REPO / "mergekit_lite" / "engine").glob("*.py"):
        source = path.read_text()
        for word in ('"magnitude"', '"dare"', "sparsification"):
            assert word not in source, f"{path.name} mentions {word}"
    elementwise = ("sparsifiers", "sparsifying", "lowrank_core", "ties", "dare", "magnitude_prune", "breadcrumbs", "della",
                   "model_stock", "registry", "knots")
    for path in (REPO / "mergekit_lite" / "methods" / f"{name}.py" for name in elementwise):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "engine" not in (node.module or ""), f"{path.name} imports {node.module}"


def test_the_new_methods_are_listed_by_merge_methods() -> None:
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    for name in NEW_METHODS:
        assert any(line.startswith(name + " ") for line in result.output.splitlines()), name


def test_merge_sweep_accepts_the_new_methods_at_their_defaults() -> None:
    from mergekit_lite.evaluation.tasks import SUITE_DIR
    from mergekit_lite.sweep.points import grid_points
    from mergekit_lite.sweep.spec import sweep_config_from_dict

    data = {"base_model": str(SUITE_DIR / "base"),
            "adapters": [{"path": str(SUITE_DIR / "adapters" / name)} for name in ("capitals", "add")],
            "sweep": {"method": list(NEW_METHODS), "parameters": {"density": [0.3, 0.6]}}}
    config = sweep_config_from_dict(data, REPO)
    points = grid_points(config.spec)
    assert {p.method for p in points} == set(NEW_METHODS)
    assert len([p for p in points if p.method == "della"]) == 2 and len([p for p in points if p.method == "model_stock"]) == 1


def test_the_card_names_the_method_its_paper_and_its_parameters(demo: Path, tmp_path: Path) -> None:
    config = demo_config(demo, tmp_path / "out", "della_linear", per_adapter=[{"epsilon": 0.05}, {}, {}],
                         parameters={"density": 0.4}, seed=3)
    card = (merge(config, device="cpu", progress=False).output_dir / "README.md").read_text()
    assert "DELLA (linear)" in card and "https://arxiv.org/abs/2406.11617" in card
    assert "epsilon" in card and "0.05" in card and "0.15" in card


@pytest.mark.parametrize(("method", "extra", "expected", "note"), [
    ("breadcrumbs", {"normalize": True}, {"lambda": 1.0 / 1.5, "density": 1.0}, None),
    ("breadcrumbs_ties", {"rescale": True}, {"normalize": False, "density": 1.0}, "L1 norm"),
    ("della", {}, {"normalize": True, "density": 1.0}, "keep probability"),
    ("della_linear", {"rescale": False}, {"rescale": False, "density": 1.0}, "counter-based stream"),
    ("model_stock", {}, {}, "zero task vector"),
])
def test_mergekit_yaml_for_the_new_methods_converts_with_mergekit_defaults(
        method: str, extra: dict, expected: dict, note: str | None) -> None:
    from mergekit_lite.compat.mergekit import convert

    data = {"merge_method": method, "base_model": "base", "parameters": extra,
            "models": [{"model": "ft_a", "parameters": {"weight": 1.0}}, {"model": "ft_b", "parameters": {"weight": 0.5}}]}
    conversion = convert(data)
    assert conversion.config["method"] == method
    params = conversion.config.get("parameters", {})
    for key, value in expected.items():
        assert params[key] == pytest.approx(value), (key, params)
    if note is not None:
        assert any(note in line for line in conversion.differences), conversion.differences
    if method == "model_stock":
        assert all("weight" not in entry for entry in conversion.config["models"])


def test_mergekit_model_stock_filter_wise_is_refused_in_one_line() -> None:
    from mergekit_lite.compat.mergekit import convert
    from mergekit_lite.errors import MergeConfigError

    data = {"merge_method": "model_stock", "base_model": "base", "parameters": {"filter_wise": True},
            "models": [{"model": "ft_a"}, {"model": "ft_b"}]}
    with pytest.raises(MergeConfigError, match="filter_wise: true"):
        convert(data)
