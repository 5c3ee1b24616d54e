"""nearswap, ram and ramplus_tl (#29) against dense float64 references transcribed from mergekit 0.1.5
(merge_methods/nearswap.py, ram.py), on sparse task vectors so that unique and shared changes both occur; chunk
size and workers change no byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.full_models import save_weights
from mergekit_lite import MergeConfig, merge
from mergekit_lite.errors import MergeConfigError

from .reference import load_checkpoint


def ref_nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a, b = a.double(), b.double()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def ref_ram(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float = 1e-5, plus: bool = False,
            r: float = 0.1, alpha: float = 0.2) -> torch.Tensor:
    tv = torch.stack([t.double() - base.double() for t in tensors]).view(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tv_z = tv * nonzero
    if not plus:
        merged = (tv_z * unique + tv_z * overlap / counts.clamp(min=1)).sum(dim=0)
    else:
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        merged = (tv_z * unique * lam.unsqueeze(-1) + tv_z * overlap / counts.clamp(min=1)).sum(dim=0)
    return base.double() + merged.reshape(base.shape)


@pytest.fixture(scope="module")
def sparse(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three fine-tunes whose task vectors change 40% of the entries each (seeded), so changes overlap."""
    root = tmp_path_factory.mktemp("sparse")
    base = load_checkpoint(demo / "base")
    models = {}
    for index, name in enumerate(("a", "b", "c")):
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for key, w in base.items():
            noise = torch.randn(w.shape, generator=generator) * 0.2 * float(w.float().std() or 1.0)
            keep = torch.rand(w.shape, generator=generator) < 0.4
            tensors[key] = (w.float() + noise * keep).to(w.dtype)
        save_weights(tensors, root / name)
        for file in ("config.json", "tokenizer.json"):
            (root / name / file).write_bytes((demo / "base" / file).read_bytes())
        models[name] = root / name
    return models


def _merge(demo: Path, out: Path, method: str, paths: list[Path], params: dict, **kw: object) -> dict:
    config = MergeConfig.from_dict({"base_model": str(demo / "base"), "method": method, "parameters": params,
                                    "models": [{"path": str(p)} for p in paths], "output": {"path": str(out)}})
    return load_checkpoint(merge(config, device="cpu", progress=False, **kw).output_dir)


@pytest.mark.parametrize("method,params,count", [
    ("nearswap", {"t": 0.01}, 1), ("ram", {}, 3), ("ramplus_tl", {"r": 0.5, "alpha": 2.0}, 2),
    pytest.param("ram", {"epsilon": 0.05}, 3, marks=pytest.mark.slow),
    pytest.param("ramplus_tl", {}, 3, marks=pytest.mark.slow),
])
def test_each_is_mergekits(demo: Path, sparse: dict[str, Path], tmp_path: Path, method: str, params: dict,
                           count: int) -> None:
    paths = [sparse[n] for n in ("a", "b", "c")][:count]
    merged = _merge(demo, tmp_path / "out", method, paths, params, chunk_rows=3)
    base = load_checkpoint(demo / "base")
    inputs = [load_checkpoint(p) for p in paths]
    for name, w in base.items():
        if method == "nearswap":
            expected = ref_nearswap(w, inputs[0][name], params["t"])
        else:
            expected = ref_ram(w, [m[name] for m in inputs], params.get("epsilon", 1e-5), method == "ramplus_tl",
                               params.get("r", 0.1), params.get("alpha", 0.2))
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0), name
    other = _merge(demo, tmp_path / "other", method, paths, params, chunk_rows=1, workers=2)
    assert all(torch.equal(merged[k], other[k]) for k in merged)


def test_nearswap_takes_one_input_and_a_t() -> None:
    with pytest.raises(MergeConfigError, match=r"'nearswap' merges 1 to 1 inputs"):
        MergeConfig.from_dict({"base_model": "b", "method": "nearswap", "parameters": {"t": 0.1},
                               "models": [{"path": "x"}, {"path": "y"}], "output": "o"})
    with pytest.raises(MergeConfigError, match=r"'nearswap' needs 't'"):
        MergeConfig.from_dict({"base_model": "b", "method": "nearswap", "models": [{"path": "x"}], "output": "o"})
