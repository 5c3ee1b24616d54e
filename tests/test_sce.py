"""sce with select_topk < 1 (mergekit's variance selection), against a dense float64 reference written from the
definition (SEMANTICS §3b): per tensor, the population variance of the uᵢ across the inputs per entry (float64,
rounded to float32), the k = ⌊select_topk · #nonzero⌋ largest kept (lower flat index first on ties), every uᵢ
zeroed elsewhere, then mergekit's weights from the masked mean squares and TIES' sign election."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from evals.full_models import copy_side_files, save_weights
from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import MergeConfigError

from .reference import load_checkpoint, ref_mask, ref_sce


@pytest.fixture(scope="module")
def tied(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base on a 2⁻¹⁰ grid and three fine-tunes adding multiples of 2⁻⁴ in {−2..2}: every τᵢ exact in float32,
    the variances few distinct values (the threshold splits a tie in every matrix)."""
    root = tmp_path_factory.mktemp("sce")
    base = load_checkpoint(demo / "base")
    grid = {name: (t.float() * 1024).round() / 1024 for name, t in base.items()}
    shutil.copytree(demo / "base", root / "base")
    save_weights(grid, root / "base")
    generator = torch.Generator().manual_seed(29)
    paths = {"base": root / "base"}
    for name in ("a", "b", "c"):
        tensors = {k: v + torch.randint(-2, 3, v.shape, generator=generator).float() / 16 for k, v in grid.items()}
        save_weights(tensors, root / name)
        copy_side_files(root / "base", root / name)
        paths[name] = root / name
    return paths


def _merge(paths: dict[str, Path], out: Path, share: float, **kw: object) -> dict[str, torch.Tensor]:
    config = MergeConfig.from_dict({"base_model": str(paths["base"]), "method": "sce",
                                    "parameters": {"select_topk": share},
                                    "models": [{"path": str(paths[n])} for n in ("a", "b", "c")],
                                    "output": {"path": str(out)}})
    return load_checkpoint(merge(config, device="cpu", progress=False, **kw).output_dir)


@pytest.mark.parametrize("share", [0.3, 0.77])
def test_sce_selection_is_the_dense_reference_for_any_chunking(tied: dict[str, Path], tmp_path: Path,
                                                                share: float) -> None:
    base, a, b, c = (load_checkpoint(tied[n]) for n in ("base", "a", "b", "c"))
    merged = _merge(tied, tmp_path / "s", share, chunk_rows=3)
    for name in base:
        expected = ref_sce(base[name], [a[name], b[name], c[name]], share)
        assert torch.allclose(merged[name].double(), expected, atol=1e-6, rtol=0), name
    for rows, workers in ((1, 2), (7, 1), (1000, 2)):
        other = _merge(tied, tmp_path / f"s{rows}_{workers}", share, chunk_rows=rows, workers=workers)
        assert all(torch.equal(merged[k], other[k]) for k in merged), (rows, workers)


def test_sce_selection_splits_a_tie(tied: dict[str, Path]) -> None:
    """The fixture does test the tie rule: in every matrix the k-th variance is shared by kept and dropped entries."""
    base, a, b, c = (load_checkpoint(tied[n]) for n in ("base", "a", "b", "c"))
    for name in (n for n, t in base.items() if t.dim() == 2):
        taus = torch.stack([(t[name] - base[name]).double() for t in (a, b, c)])
        variance = taus.var(dim=0, unbiased=False).to(torch.float32)
        for share in (0.3, 0.77):
            mask = ref_mask(taus, share)
            assert bool((variance[~mask] == variance[mask].min()).any()), (name, share)


def test_sce_with_one_input_keeps_the_base(tied: dict[str, Path], tmp_path: Path) -> None:
    """One input has no variance anywhere: k = 0, nothing kept, as in mergekit."""
    config = MergeConfig.from_dict({"base_model": str(tied["base"]), "method": "sce",
                                    "parameters": {"select_topk": 0.5}, "models": [{"path": str(tied["a"])}],
                                    "output": {"path": str(tmp_path / "o")}})
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base = load_checkpoint(tied["base"])
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_sce_select_topk_must_be_positive() -> None:
    with pytest.raises(MergeConfigError, match="select_topk"):
        MergeConfig.from_dict({"base_model": "b", "method": "sce", "parameters": {"select_topk": 0.0},
                               "models": [{"path": "m"}], "output": "o"})


def test_sce_selection_through_the_radix_fallback_is_the_same(tied: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact fallback (radix select, taken on CUDA or when the sampled band misses) keeps the same entries."""
    from mergekit_lite.engine import select

    sampled = _merge(tied, tmp_path / "band", 0.3, chunk_rows=5)
    monkeypatch.setattr(select, "_sampled_band", lambda *args, **kwargs: None)
    radix = _merge(tied, tmp_path / "radix", 0.3, chunk_rows=5)
    assert all(torch.equal(sampled[k], radix[k]) for k in sampled)
