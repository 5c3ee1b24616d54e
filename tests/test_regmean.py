"""RegMean exact in the LoRA factors (SEMANTICS §3e), against a dense float64 reference on the full weights.

The reference below is written from the paper's definition alone: in the paper's x·W convention (W_p = Wᵀ for our
out×in W), W_p* = (Σᵢ wᵢG̃ᵢ + δI)⁻¹ (Σᵢ wᵢG̃ᵢ W_pᵢ + δ W_p) with W_pᵢ = (W + τᵢ)ᵀ built dense (δ: the stated ridge
toward the base), every adapter's G̃ᵢ counting, touching the tensor or not. The package never builds m×n.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from evals.fixtures import build_adapter
from mergekit_lite import describe_plan, merge
from mergekit_lite.api import prepare
from mergekit_lite.calibration import calibration_sources
from mergekit_lite.calibration.gram import Batch, GramTarget, gather
from mergekit_lite.cli import main
from mergekit_lite.config import load_config
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.methods import FactoredContext, LowRankFactors, get_method
from mergekit_lite.methods.regmean import (
    JITTER,
    RegMeanStatistics,
    TensorGram,
    averaged_vectors,
    check_weights,
    modified_gram,
    regmean_factors,
)
from tests.configs import DEMO_ADAPTERS, config_data, merge_config
from tests.conftest import REPO, write_config
from tests.reference import load_checkpoint, plain_lora_task_vectors

# ------------------------------------------------------------------------------------------------------------
# the dense reference (numpy float64, whole matrices)
# ------------------------------------------------------------------------------------------------------------


def ref_tilde(gram: np.ndarray, alpha: float) -> np.ndarray:
    """G̃ = αG + (1−α)diag(G)."""
    return alpha * gram + (1 - alpha) * np.diag(np.diag(gram))


def ref_regmean_linear(w: np.ndarray, taus: Sequence[np.ndarray], grams: Sequence[np.ndarray],
                       weights: Sequence[float], alpha: float) -> np.ndarray:
    """W* (out×in) of RegMean over the full models W + τᵢ, y = W x; grams[i] is adapter i's XᵢᵀXᵢ (in×in)."""
    tildes = [ref_tilde(g, alpha) for g in grams]
    total = sum(wt * t for wt, t in zip(weights, tildes))
    delta = JITTER * np.trace(total) / total.shape[0]
    rhs = sum(wt * t @ (w + tau).T for wt, t, tau in zip(weights, tildes, taus)) + delta * w.T
    return np.linalg.solve(total + delta * np.eye(total.shape[0]), rhs).T


def ref_regmean_conv1d(w_stored: np.ndarray, taus_stored: Sequence[np.ndarray], grams: Sequence[np.ndarray],
                       weights: Sequence[float], alpha: float) -> np.ndarray:
    """The same for a GPT-2 Conv1D, y = x W with W stored in×out: the paper's convention as it is."""
    tildes = [ref_tilde(g, alpha) for g in grams]
    total = sum(wt * t for wt, t in zip(weights, tildes))
    delta = JITTER * np.trace(total) / total.shape[0]
    rhs = sum(wt * t @ (w_stored + tau) for wt, t, tau in zip(weights, tildes, taus_stored)) + delta * w_stored
    return np.linalg.solve(total + delta * np.eye(total.shape[0]), rhs)


# ------------------------------------------------------------------------------------------------------------
# fixtures: random factors and Grams; the package's statistics built as SEMANTICS §3e says
# ------------------------------------------------------------------------------------------------------------


def random_case(seed: int, m: int = 11, n: int = 9, ranks: Sequence[int] = (2, 3, 1), tokens: Sequence[int] = (40, 25, 33)):
    """W (m×n), per adapter (B m×r, A r×n, s) and X (tokens × n) (float64 numpy)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n))
    def f32(x: np.ndarray) -> np.ndarray:  # float32 values (as adapter files hold), in float64
        return x.astype(np.float32).astype(np.float64)
    adapters = [(f32(rng.standard_normal((m, r))), f32(rng.standard_normal((r, n))), float(rng.uniform(0.5, 2.0)))
                for r in ranks]
    inputs = [rng.standard_normal((t, n)) * rng.uniform(0.2, 3.0, size=n) for t in tokens]
    return w, adapters, inputs


def statistics_for(tensor: str, side: str, a_of: dict[int, np.ndarray], inputs: Sequence[np.ndarray],
                   weights: Sequence[float], alpha: float, normalize: bool) -> RegMeanStatistics:
    """S = Σ wⱼG̃ⱼ and AᵢG̃ᵢ from whole Gram matrices (what gram.gather accumulates, in one go)."""
    tildes = []
    for x in inputs:
        g = x.T @ x / (x.shape[0] if normalize else 1.0)
        tildes.append(modified_gram(torch.from_numpy(g), alpha))
    total = sum(float(wt) * t for wt, t in zip(weights, tildes))
    projected = {i: torch.from_numpy(a) @ tildes[i] for i, a in a_of.items()}
    return RegMeanStatistics({tensor: TensorGram(side, total, projected)}, weights=tuple(weights))


def context_for(tensor: str, shape: tuple[int, int], adapters: Sequence[int], weights: Sequence[float]) -> FactoredContext:
    return FactoredContext(tensor, shape, 0, tuple(adapters), tuple({} for _ in adapters), tuple(weights))


class ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple) else (out,):
            if isinstance(item, torch.Tensor):
                self.shapes.append(tuple(item.shape))
        return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha,normalize", [(0.9, True), (1.0, False), (0.5, True)])
def test_regmean_factors_equal_dense_reference_on_full_weights(seed: int, alpha: float, normalize: bool) -> None:
    w, adapters, inputs = random_case(seed)
    weights = [1.0, 0.7, 1.6]
    touching = [0, 2]  # adapter 1 does not touch this tensor: τ₁ = 0, but its Gram still counts
    stats = statistics_for("t", "cols", {i: adapters[i][1] for i in touching}, inputs, weights, alpha, normalize)
    factors = [LowRankFactors(torch.from_numpy(adapters[i][0]).float(), torch.from_numpy(adapters[i][1]).float(),
                              adapters[i][2]) for i in touching]
    recorder = ShapeRecorder()
    with recorder:
        left, right = regmean_factors(factors, [weights[i] for i in touching], {"alpha": alpha},
                                      context_for("t", w.shape, touching, weights), statistics=stats)
    assert (11, 9) not in recorder.shapes and (9, 11) not in recorder.shapes  # never an m×n matrix
    assert left.dtype == right.dtype == torch.float64 and left.shape == (11, 3) and right.shape == (3, 9)
    # the reference reads the same float32 factor values, in float64
    taus = [np.zeros_like(w) for _ in range(3)]
    for i in touching:
        b, a = (torch.from_numpy(x).float().double().numpy() for x in adapters[i][:2])
        taus[i] = adapters[i][2] * b @ a
    grams = [x.T @ x / (x.shape[0] if normalize else 1.0) for x in inputs]
    expected = ref_regmean_linear(w, taus, grams, weights, alpha)
    got = w + (left @ right).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-10 * max(1.0, np.max(np.abs(expected)))


@pytest.mark.parametrize("seed", [0, 3])
def test_regmean_conv1d_orientation_equals_reference(seed: int) -> None:
    """GPT-2 Conv1D stores W in×out and reads y = x W: the Gram acts on the rows; τᵢ = s(BA)ᵀ."""
    rng = np.random.default_rng(seed + 100)
    d_in, d_out = 9, 13
    w_stored = rng.standard_normal((d_in, d_out))
    lora = [(rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in)), 1.5) for r in (2, 3)]  # B out×r, A r×in
    xs = [rng.standard_normal((t, d_in)) for t in (30, 20)]
    weights = [1.0, 1.0]
    stats = statistics_for("c", "rows", {0: lora[0][1], 1: lora[1][1]}, xs, weights, 0.9, True)
    # the engine's factors of a Conv1D tensor: left = Aᵀ (in×r), right = Bᵀ (r×out)
    factors = [LowRankFactors(torch.from_numpy(a.T.copy()), torch.from_numpy(b.T.copy()), s) for b, a, s in lora]
    left, right = regmean_factors(factors, weights, {}, context_for("c", (d_in, d_out), [0, 1], weights), statistics=stats)
    taus = [s * (b @ a).T for b, a, s in lora]
    expected = ref_regmean_conv1d(w_stored, taus, [x.T @ x / x.shape[0] for x in xs], weights, 0.9)
    got = w_stored + (left @ right).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-10 * np.max(np.abs(expected))


def test_identical_adapters_give_that_adapter() -> None:
    w, adapters, inputs = random_case(4, ranks=(3, 3, 3))
    b, a, s = adapters[0]
    stats = statistics_for("t", "cols", {0: a, 1: a, 2: a}, inputs, [1.0, 1.0, 1.0], 0.9, True)
    factors = [LowRankFactors(torch.from_numpy(b), torch.from_numpy(a), s)] * 3
    left, right = regmean_factors(factors, [1.0] * 3, {}, context_for("t", w.shape, [0, 1, 2], [1.0] * 3),
                                  statistics=stats)
    tau = s * b @ a
    assert np.max(np.abs((left @ right).numpy() - tau)) <= 1e-8 * np.max(np.abs(tau))


def test_identity_grams_reduce_to_the_weighted_average() -> None:
    """G̃ᵢ = I for every adapter (α arbitrary: diagonal Grams): ΔW* = Σ wᵢτᵢ / Σ wⱼ, the linear average."""
    w, adapters, _ = random_case(5)
    weights = [1.0, 2.0, 0.5]
    eye = torch.eye(9, dtype=torch.float64)
    total = weights[0] * eye + weights[1] * eye + weights[2] * eye
    stats = RegMeanStatistics({"t": TensorGram("cols", total, {i: torch.from_numpy(adapters[i][1]) @ eye
                                                                for i in range(3)})})
    factors = [LowRankFactors(torch.from_numpy(b), torch.from_numpy(a), s) for b, a, s in adapters]
    left, right = regmean_factors(factors, weights, {}, context_for("t", w.shape, [0, 1, 2], weights), statistics=stats)
    expected = sum(wt * s * b @ a for wt, (b, a, s) in zip(weights, adapters)) / sum(weights)
    assert np.max(np.abs((left @ right).numpy() - expected)) <= 1e-8 * np.max(np.abs(expected))


def test_averaged_tensors_and_bias_shifts_take_the_linear_average_over_every_adapter() -> None:
    """Embeddings (no linear input to weigh) and lora_bias shifts: Σ wᵢτᵢ / Σ wⱼ, adapters not touching count."""
    rng = np.random.default_rng(6)
    b, a = rng.standard_normal((7, 2)), rng.standard_normal((2, 5))
    stats = RegMeanStatistics({}, averaged=frozenset({"embed"}))
    all_weights = (1.0, 3.0)
    left, right = regmean_factors([LowRankFactors(torch.from_numpy(b), torch.from_numpy(a), 2.0)], [1.0], {},
                                  context_for("embed", (7, 5), [0], all_weights), statistics=stats)
    assert np.allclose((left @ right).numpy(), 2.0 * b @ a / 4.0, rtol=1e-14, atol=0)
    shifts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]
    merged = averaged_vectors(shifts, [1.0, 3.0], {}, context_for("bias", (2, 1), [0, 1], all_weights))
    assert torch.allclose(merged, (shifts[0] + 3 * shifts[1]) / 4)


def test_singular_or_broken_grams_are_config_errors_naming_the_tensor() -> None:
    w, adapters, _ = random_case(7)
    factors = [LowRankFactors(torch.from_numpy(adapters[0][0]), torch.from_numpy(adapters[0][1]), 1.0)]
    context = context_for("layers.0.q.weight", w.shape, [0], [1.0])
    projected = {0: torch.zeros(2, 9, dtype=torch.float64)}
    cases = {
        "all zero": torch.zeros(9, 9, dtype=torch.float64),
        "not positive definite": torch.diag(torch.tensor([1.0] * 8 + [-5.0], dtype=torch.float64)),
        "inf/NaN": torch.full((9, 9), float("nan"), dtype=torch.float64),
    }
    for words, total in cases.items():
        stats = RegMeanStatistics({"layers.0.q.weight": TensorGram("cols", total, projected)})
        with pytest.raises(MergeConfigError, match=f"tensor 'layers.0.q.weight'.*{words}" if words != "inf/NaN"
                           else r"tensor 'layers.0.q.weight'.*inf/NaN"):
            regmean_factors(factors, [1.0], {}, context, statistics=stats)


def test_a_singular_gram_within_the_ridge_gives_the_minimum_change_solution() -> None:
    """α = 1 and fewer tokens than input features: S is singular, S + δI is not; the change stays finite and
    equals the reference's (the ridge pulls toward the base)."""
    w, adapters, _ = random_case(8, ranks=(2, 2, 2))
    rng = np.random.default_rng(8)
    inputs = [rng.standard_normal((3, 9)) for _ in range(3)]  # rank 3 each, 9 features: Σ rank ≤ 9 but S singular
    inputs[2] = inputs[0].copy()
    stats = statistics_for("t", "cols", {i: adapters[i][1] for i in range(3)}, inputs, [1.0] * 3, 1.0, True)
    factors = [LowRankFactors(torch.from_numpy(b), torch.from_numpy(a), s) for b, a, s in adapters]
    left, right = regmean_factors(factors, [1.0] * 3, {}, context_for("t", w.shape, [0, 1, 2], [1.0] * 3),
                                  statistics=stats)
    taus = [s * b @ a for b, a, s in adapters]
    expected = ref_regmean_linear(w, taus, [x.T @ x / 3 for x in inputs], [1.0] * 3, 1.0)
    assert bool(torch.isfinite(left @ right).all())
    # S + δI has a condition number near 1/JITTER: rounding is amplified that much, so close, not 1e-10
    assert np.max(np.abs(w + (left @ right).numpy() - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_alpha_and_weights_are_checked() -> None:
    method = get_method("regmean")
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(MergeConfigError, match="'alpha' must be in \\(0, 1\\]"):
            method.resolve_params({"alpha": bad}, [{}, {}], [1.0, 1.0])
    with pytest.raises(MergeConfigError, match=r"adapters\[1\].*positive weights"):
        check_weights([1.0, 0.0], {}, [{}, {}])
    with pytest.raises(MergeConfigError, match=r"adapters\[0\].*positive weights"):
        check_weights([-1.0, 1.0], {}, [{}, {}])


# ------------------------------------------------------------------------------------------------------------
# the statistics: forward hooks on a tiny model with LoRA branches
# ------------------------------------------------------------------------------------------------------------


class Branch(torch.nn.Module):
    """y = W x + s·B(A x) when this adapter is active."""

    def __init__(self, base: torch.nn.Linear, loras: dict[int, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        super().__init__()
        self.base, self.loras, self.active = base, loras, -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active in self.loras:
            b, a, s = self.loras[self.active]
            y = y + s * (x @ a.T) @ b.T
        return y


class TinyBlock(torch.nn.Module):
    """q and k read one input (the attention-like pair), up reads q·k's sum, down reads up's output."""

    def __init__(self, width: int, hidden: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = torch.nn.Linear(width, width, bias=False)
        self.k = torch.nn.Linear(width, width, bias=False)
        self.up = torch.nn.Linear(width, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, width, bias=False)
        for lin in (self.q, self.k, self.up, self.down):
            lin.weight.data = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * 0.4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + torch.tanh(self.q(x) * self.k(x))
        return h + self.down(torch.tanh(self.up(h)))


def tiny_model(seed: int = 0, width: int = 6, hidden: int = 10) -> tuple[dict[str, Branch], Callable[[int, Batch], None]]:
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(20, width).double()
    blocks = torch.nn.ModuleList([TinyBlock(width, hidden, seed + i) for i in range(2)])
    g = torch.Generator().manual_seed(seed + 50)
    # adapter 0 targets q, up of block 0 and k of block 1; adapter 1 targets q, k, down everywhere
    targets = {0: ["0.q", "0.up", "1.k"], 1: [f"{b}.{m}" for b in (0, 1) for m in ("q", "k", "down")]}
    modules: dict[str, Branch] = {}
    for b, block in enumerate(blocks):
        for m in ("q", "k", "up", "down"):
            name = f"{b}.{m}"
            base = getattr(block, m)
            loras = {}
            for i, own in targets.items():
                if name in own:
                    r = 2 + i
                    loras[i] = (torch.randn(base.out_features, r, generator=g, dtype=torch.float64) * 0.3,
                                torch.randn(r, base.in_features, generator=g, dtype=torch.float64) * 0.3, 1.25)
            wrapped = Branch(base, loras)
            setattr(block, m, wrapped)
            modules[name] = wrapped

    def forward(index: int, batch: Batch) -> None:
        for module in modules.values():
            module.active = index
        h = emb(batch[0])
        for block in blocks:
            h = block(h)

    return modules, forward


def batches_for(seed: int, count: int, vocab: int = 20) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (3, 5), generator=g)
        mask = torch.ones(3, 5, dtype=torch.long)
        lengths = torch.randint(1, 6, (3,), generator=g)
        for row, n in enumerate(lengths):
            mask[row, int(n):] = 0
        out.append((ids, mask))
    return out


def recorded_grams(modules: dict[str, Branch], forward: Callable[[int, Batch], None],
                   batches: Sequence[Sequence[Batch]]) -> dict[tuple[int, str], np.ndarray]:
    """Per adapter and module, Xᵀ X of the module's unpadded inputs and the token count, recorded plainly."""
    grams: dict[tuple[int, str], np.ndarray] = {}
    for index, own in enumerate(batches):
        for batch in own:
            seen = {}
            handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
                       for name, m in modules.items()]
            with torch.no_grad():
                forward(index, batch)
            for h in handles:
                h.remove()
            keep = batch[1].reshape(-1).bool()
            for name, x in seen.items():
                rows = x.reshape(-1, x.shape[-1])[keep].numpy()
                grams[(index, name)] = grams.get((index, name), 0) + rows.T @ rows
    return grams


def targets_of(modules: dict[str, Branch]) -> list[GramTarget]:
    return [GramTarget(name, m, "cols", {i: lora[1] for i, lora in m.loras.items()})
            for name, m in modules.items() if m.loras]


@pytest.mark.parametrize("alpha,normalize", [(0.9, True), (1.0, False)])
def test_gathered_statistics_equal_the_grams_of_each_adapters_model(alpha: float, normalize: bool) -> None:
    modules, forward = tiny_model()
    batches = [batches_for(1, 2), batches_for(2, 3)]
    weights = [1.0, 0.6]
    stats = gather(targets_of(modules), batches, weights, forward, alpha, normalize, budget=1 << 30, solve=False)
    assert stats.passes == 1 and stats.inputs == 5
    grams = recorded_grams(modules, forward, batches)
    tokens = [sum(int(m.sum()) for _, m in own) for own in batches]
    assert stats.tokens == tuple(tokens)
    for name, module in modules.items():
        if not module.loras:
            continue
        tildes = [ref_tilde(grams[(i, name)] / (tokens[i] if normalize else 1), alpha) for i in range(2)]
        total = stats.grams[name].total.numpy()
        assert np.allclose(total, weights[0] * tildes[0] + weights[1] * tildes[1], rtol=1e-12, atol=1e-12)
        for i, lora in module.loras.items():
            assert np.allclose(stats.grams[name].projected[i].numpy(), lora[1].numpy() @ tildes[i], rtol=1e-12,
                               atol=1e-12)
    # q and k of a block read the same input: one sum, shared
    assert stats.grams["0.q"].total is stats.grams["0.k"].total


def test_statistics_in_groups_of_layers_are_the_same_bytes() -> None:
    modules, forward = tiny_model(3)
    batches = [batches_for(4, 2), batches_for(5, 2)]
    for solve in (False, True):
        whole = gather(targets_of(modules), batches, [1.0, 1.0], forward, 0.9, True, budget=1 << 30, solve=solve)
        grouped = gather(targets_of(modules), batches, [1.0, 1.0], forward, 0.9, True, budget=1, solve=solve)
        assert whole.passes == 1 and grouped.passes == 5  # five inputs: (0.q, 0.k), 0.up, 0.down, (1.q, 1.k), 1.down
        for name, gram in whole.grams.items():
            assert gram.solved == grouped.grams[name].solved == solve
            if not solve:
                assert torch.equal(gram.total, grouped.grams[name].total)
            for i in gram.projected:
                assert torch.equal(gram.projected[i], grouped.grams[name].projected[i])
        assert grouped.nbytes < whole.nbytes


def test_regmean_on_a_model_equals_the_reference_solved_on_full_weights() -> None:
    """Statistics from hooks, then the factors: W + L·R equals RegMean solved densely on W + τᵢ (1e-10)."""
    modules, forward = tiny_model(7)
    batches = [batches_for(8, 3), batches_for(9, 2)]
    weights = [1.0, 1.0]
    stats = gather(targets_of(modules), batches, weights, forward, 0.9, True, budget=1 << 30)
    grams = recorded_grams(modules, forward, batches)
    for name, module in modules.items():
        if not module.loras:
            continue
        w = module.base.weight.detach().numpy()
        touching = sorted(module.loras)
        factors = [LowRankFactors(module.loras[i][0], module.loras[i][1], module.loras[i][2]) for i in touching]
        left, right = regmean_factors(factors, [1.0] * len(touching), {},
                                      context_for(name, w.shape, touching, weights), statistics=stats)
        taus = [np.zeros_like(w) for _ in range(2)]
        for i in touching:
            b, a, s = module.loras[i]
            taus[i] = s * (b @ a).numpy()
        tokens = [sum(int(m.sum()) for _, m in own) for own in batches]
        expected = ref_regmean_linear(w, taus, [grams[(i, name)] / tokens[i] for i in range(2)], weights, 0.9)
        assert np.max(np.abs(w + (left @ right).numpy() - expected)) <= 1e-10 * np.max(np.abs(expected)), name


# ------------------------------------------------------------------------------------------------------------
# end to end: `merge` with calibration prompts, against a reference built with PEFT's own merged models
# ------------------------------------------------------------------------------------------------------------

PROMPTS = [["Q: capital of Velifia\nA:", "hello world", "Q: 2+3\nA:", "the cat sat on the mat", "x"],
           ["abc def ghi", "Q: reverse abc\nA:", "12345 67890", "Q: sentiment of great\nA:"]]


def write_prompts(folder: Path, prompts: Sequence[Sequence[str]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, own in enumerate(prompts):
        path = folder / f"prompts{n}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in own))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def regmean_inputs(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two adapters on the tiny Llama with overlapping module sets, one on GPT-2 (Conv1D) pairs, and prompts."""

    root = tmp_path_factory.mktemp("regmean")
    llama = [build_adapter(bases["llama"], root / "l0", seed=11, r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
             build_adapter(bases["llama"], root / "l1", seed=12, r=2, target_modules=["q_proj", "k_proj", "o_proj",
                                                                                       "gate_proj", "up_proj"])]
    gpt2 = [build_adapter(bases["gpt2"], root / "g0", seed=13, r=3),
            build_adapter(bases["gpt2"], root / "g1", seed=14, r=2, target_modules=["c_attn"])]
    return {"llama": (bases["llama"], llama), "gpt2": (bases["gpt2"], gpt2), "prompts": write_prompts(root, PROMPTS)}


def regmean_config(base: Path, adapters: Sequence[Path], prompts: Sequence[Path], out: Path, **output: Any) -> Any:
    return merge_config(base, [{"path": a, "calibration": str(p)} for a, p in zip(adapters, prompts)], out, "regmean",
                        parameters={"alpha": 0.9}, output={"dtype": "float32", **output})


def peft_grams(base: Path, adapters: Sequence[Path], prompts: Sequence[Sequence[str]]) -> list[dict[str, np.ndarray]]:
    """Per adapter: {module path: XᵀX of its input} on PEFT's merge_and_unload of that adapter alone, each prompt
    run alone (no padding at all), tokenized as the tokenizer encodes text (its BOS first), as lm-eval reads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    out = []
    for adapter, own in zip(adapters, prompts):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          adapter).merge_and_unload().eval()
        grams: dict[str, np.ndarray] = {}
        tokens = 0
        for prompt in own:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            tokens += ids.shape[1]
            seen = {}
            handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
                       for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
            with torch.no_grad():
                model(input_ids=ids)
            for h in handles:
                h.remove()
            for name, x in seen.items():
                rows = x.reshape(-1, x.shape[-1]).double().numpy()
                grams[name] = grams.get(name, 0) + rows.T @ rows
        out.append({name: g / tokens for name, g in grams.items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_the_reference_on_peft_merged_models(arch: str, regmean_inputs: dict[str, Any],
                                                          tmp_path: Path) -> None:
    base, adapters = regmean_inputs[arch]
    prompts = regmean_inputs["prompts"]
    merge(regmean_config(base, adapters, prompts, tmp_path / "out"), progress=False)
    merged, w0 = load_checkpoint(tmp_path / "out"), load_checkpoint(base)
    grams = peft_grams(base, adapters, PROMPTS)
    taus = [plain_lora_task_vectors(a) for a in adapters]  # s·B·A, out×in
    changed = 0
    for name, w in w0.items():
        if not any(name in t for t in taus):
            assert torch.equal(merged[name], w), name
            continue
        g = [own[name.removesuffix(".weight")] for own in grams]
        wd = w.double().numpy()
        tau = [t[name].double().numpy() if name in t else np.zeros((wd.shape[1], wd.shape[0]) if arch == "gpt2"
                                                                    else wd.shape) for t in taus]
        if arch == "gpt2":  # Conv1D stores W in×out: τ stored = (s·B·A)ᵀ
            expected = ref_regmean_conv1d(wd, [t.T for t in tau], g, [1.0, 1.0], 0.9)
        else:
            expected = ref_regmean_linear(wd, tau, g, [1.0, 1.0], 0.9)
        change = np.max(np.abs(expected - wd))
        diff = np.max(np.abs(merged[name].double().numpy() - expected))
        assert diff <= 1e-4 * change + 4 * np.finfo(np.float32).eps * np.max(np.abs(wd)), (name, diff, change)
        changed += 1
    assert changed >= 4


@pytest.mark.slow
def test_chunking_and_workers_change_no_byte_and_the_peft_output_is_exact(regmean_inputs: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    base, adapters = regmean_inputs["llama"]
    prompts = regmean_inputs["prompts"]
    merge(regmean_config(base, adapters, prompts, tmp_path / "a"), progress=False)
    merge(regmean_config(base, adapters, prompts, tmp_path / "b"), progress=False, chunk_rows=3, workers=2)
    for name in ("model.safetensors",):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    merge(regmean_config(base, adapters, prompts, tmp_path / "p", format="peft"), progress=False)
    written = load_file(tmp_path / "p" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    checkpoint, w0 = load_checkpoint(tmp_path / "a"), load_checkpoint(base)
    checked = 0
    for key, a in written.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = written[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        pattern = config.get("rank_pattern") or {}
        alphas = config.get("alpha_pattern") or {}
        alpha = next((v for k, v in alphas.items() if module.endswith(k)), config["lora_alpha"])
        rank = next((v for k, v in pattern.items() if module.endswith(k)), config["r"])
        assert rank == r, module
        delta = (alpha / r) * (b.double() @ a.double())
        name = f"{module}.weight"
        expected = checkpoint[name].double() - w0[name].double()
        assert torch.max(torch.abs(delta - expected)) <= 1e-5 * torch.max(torch.abs(expected)) + 1e-6, name
        checked += 1
    assert checked >= 5


# ------------------------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------------------


def _blow_up(root: Path) -> None:
    """The style adapter's lora_B scaled by 1e30: its model's activations overflow to inf."""
    path = root / "adapters" / "style" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in tensors.items()}, path)


def _dora(root: Path) -> None:
    shutil.rmtree(root / "adapters" / "style")
    build_adapter(root / "base", root / "adapters" / "style", variant="dora", seed=5)


BAD = {
    "adapter without calibration": (lambda c, p: c["adapters"][1].pop("calibration"), None, "adapters[1]: no calibration data"),
    "alpha 0": (lambda c, p: c.update(parameters={"alpha": 0}), None, "'alpha' must be in (0, 1]"),
    "alpha above 1": (lambda c, p: c.update(parameters={"alpha": 1.5}), None, "'alpha' must be in (0, 1]"),
    "zero weight": (lambda c, p: c["adapters"][0].update(weight=0.0), None, "positive weights"),
    "per-layer weight": (lambda c, p: c["adapters"][0].update(weight=[1.0, 0.5]), None, "constant weights"),
    "empty calibration file": (lambda c, p: (p.write_text(""), None), None, "holds no prompts"),
    "statistics_memory not a size": (lambda c, p: c.update(parameters={"statistics_memory": "lots"}), None,
                                     "'statistics_memory' must be a size"),
    "DoRA adapter": (lambda c, p: None, _dora, "DoRA"),
    "full fine-tune": (lambda c, p: c.update(models=[{"path": c["base_model"], "calibration": str(p)}]), None,
                       "full"),
    "activations overflow": (lambda c, p: None, _blow_up, "inf/NaN"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "DoRA adapter" else c
                                  for c in BAD])  # building a DoRA adapter imports PEFT: seconds
def test_bad_regmean_inputs_stop_with_one_line(case: str, demo_copy: Path, tmp_path: Path) -> None:
    edit_config, damage, expected = BAD[case]
    if damage is not None:
        damage(demo_copy)
    prompts = write_prompts(tmp_path / "prompts", PROMPTS + [PROMPTS[0]])
    out = tmp_path / "outputs" / "merged"
    config = config_data(demo_copy / "base", [{"path": demo_copy / "adapters" / name, "calibration": str(p)}
                                              for name, p in zip(DEMO_ADAPTERS, prompts)], out, "regmean")
    edit_config(config, prompts[0])
    result = CliRunner().invoke(main, ["run", str(write_config(tmp_path, config)), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_the_shipped_suite_config_plans_a_regmean_merge_from_train_prompts() -> None:
    config = load_config(REPO / "merge_configs" / "regmean_suite.yaml")
    assert config.method == "regmean" and config.global_params["alpha"] == 0.9
    sources = calibration_sources(config)
    assert [s.kind for s in sources] == ["jsonl"] * 4
    assert all(s.reference.endswith("train.jsonl") and s.size == 64 for s in sources)  # never validation or test
    assert "dry run: nothing written" in describe_plan(config, device="cpu")


def test_the_readme_regmean_row_is_the_committed_report() -> None:
    """README's defaults row (LL ret. / acc ret. / avg acc) equals evals/results/regmean/scores.json, which
    `merge eval merge_configs/regmean_suite.yaml --out evals/results/regmean` wrote."""
    scores = json.loads((REPO / "evals" / "results" / "regmean" / "scores.json").read_text())
    retention = scores["retention"]["regmean"]
    ll = np.mean(list(retention["answer_ll"].values()))
    acc = np.mean(list(retention["acc"].values()))
    avg = np.mean([task["acc"] for task in scores["scores"]["regmean"].values()])
    readme = (REPO / "README.md").read_text()
    row = re.search(r"\| \*\*regmean, defaults\*\* [^|]*\| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", readme)
    assert row, "README lost regmean's defaults row"
    assert row.groups() == (f"{ll:.2f}", f"{acc:.2f}", f"{avg:.3f}")


@pytest.mark.slow
def test_the_sweeps_in_memory_merge_is_the_written_checkpoint(regmean_inputs: dict[str, Any], tmp_path: Path) -> None:
    """`merge sweep` calibrates, then merges the touched tensors in memory: the same bytes `merge run` writes."""
    from mergekit_lite.api import prepare
    from mergekit_lite.sweep.memory import merged_tensors

    base, adapters = regmean_inputs["llama"]
    config = regmean_config(base, adapters, regmean_inputs["prompts"], tmp_path / "out")
    merge(config, progress=False)
    written = load_checkpoint(tmp_path / "out")
    with prepare(config) as prepared:
        tensors = merged_tensors(prepared, torch.device("cpu"))
    assert tensors and all(torch.equal(value, written[name]) for name, value in tensors.items())


@pytest.mark.slow
def test_bias_shifts_and_lora_embeddings_take_the_average_over_every_adapter(bases: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """A lora_bias shift and a LoRA embedding (no saved base embedding) are averaged, Σ wᵢτᵢ / Σ wⱼ, the adapter
    that does not touch them counting in Σ wⱼ; the linear weights beside them still get RegMean."""
    prompts = write_prompts(tmp_path / "prompts", PROMPTS)
    cases = {"bias": (bases["llama_bias"], "model.layers.0.self_attn.q_proj.bias"),
             "embedding": (bases["llama"], "model.embed_tokens.weight")}
    for variant, (base, name) in cases.items():
        own = build_adapter(base, tmp_path / f"{variant}0", variant=variant, seed=21)
        if variant == "embedding":  # a LoRA embedding alone: drop the full base embedding PEFT saves beside it
            path = own / "adapter_model.safetensors"
            save_file({k: v for k, v in load_file(path).items() if "base_layer" not in k}, path)
        other = build_adapter(base, tmp_path / f"{variant}1", seed=22, target_modules=["q_proj", "k_proj"])
        out = tmp_path / f"out_{variant}"
        weights = [1.0, 3.0]
        config = merge_config(base, [{"path": a, "calibration": str(p), "weight": w}
                                     for a, p, w in zip((own, other), prompts, weights)], out, "regmean",
                              output={"dtype": "float32"})
        merge(config, progress=False)
        merged, w0 = load_checkpoint(out), load_checkpoint(base)
        adapter = load_file(own / "adapter_model.safetensors")
        settings = json.loads((own / "adapter_config.json").read_text())
        scale = settings["lora_alpha"] / settings["r"]
        if variant == "bias":
            tau = scale * adapter[f"base_model.model.{name.replace('.bias', '.lora_B.bias')}"].double()
        else:
            a = adapter["base_model.model.model.embed_tokens.lora_embedding_A"].double()
            b = adapter["base_model.model.model.embed_tokens.lora_embedding_B"].double()
            tau = scale * (b @ a).T
        expected = w0[name].double() + weights[0] * tau / sum(weights)
        assert torch.max(torch.abs(merged[name].double() - expected)) <= 1e-6 * torch.max(torch.abs(tau)), variant
        assert not torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], w0["model.layers.0.self_attn.k_proj.weight"])


# ------------------------------------------------------------------------------------------------------------
# the output layout before the calibration: a declared rank, never placeholder factors
# ------------------------------------------------------------------------------------------------------------


def test_the_uncalibrated_phase_declares_its_rank_and_refuses_factors() -> None:
    phase = get_method("regmean").phase
    assert phase.rank is not None and phase.rank([2, 3, 1]) == 6
    _, adapters, _ = random_case(0)
    factors = [LowRankFactors(torch.from_numpy(b), torch.from_numpy(a), s) for b, a, s in adapters]
    with pytest.raises(AssertionError, match="before the calibration"):
        phase.factors(factors, [1.0, 1.0, 1.0], {}, context_for("layers.0.q.weight", (11, 9), [0, 1, 2], [1.0] * 3))


@pytest.mark.slow
def test_a_peft_regmean_merge_is_planned_from_declared_ranks(demo: Path, tmp_path: Path) -> None:
    """The adapter's layout is planned before the calibration from Σ rᵢ; every factor written is finite and as
    wide as the layout said (the uncalibrated phase would have raised had the writer asked it for factors)."""
    prompts = write_prompts(tmp_path / "prompts", PROMPTS + [PROMPTS[0]])
    adapters = [{"path": demo / "adapters" / name, "calibration": str(p)} for name, p in zip(DEMO_ADAPTERS, prompts)]
    out = tmp_path / "peft"
    result = merge(merge_config(demo / "base", adapters, out, "regmean", output={"format": "peft"}), device="cpu",
                   progress=False)
    assert result.output_format == "peft" and result.tensors_merged > 0
    written = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {}
    for name in DEMO_ADAPTERS:
        own = load_file(demo / "adapters" / name / "adapter_model.safetensors")
        for key, a in own.items():
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                ranks[module] = ranks.get(module, 0) + a.shape[0]
    assert written and all(torch.isfinite(t).all() for t in written.values())
    for key, a in written.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            assert a.shape[0] == ranks[module], module
            assert (config.get("rank_pattern") or {}).get(module, config["r"]) == ranks[module], module


def test_the_dry_run_says_what_the_calibration_will_do(demo: Path, tmp_path: Path) -> None:
    """No QR/SVD lines: the prompts per adapter, one pass each with hooks (no teachers, no training), the float64
    statistics' size from the definition (per module d_in² + Σrᵢ·d_in, 8 bytes: an upper bound) and the solve."""
    prompts = write_prompts(tmp_path / "prompts", PROMPTS + [PROMPTS[0]])
    adapters = [{"path": demo / "adapters" / name, "calibration": str(p)} for name, p in zip(DEMO_ADAPTERS, prompts)]
    config = merge_config(demo / "base", adapters, tmp_path / "m", "regmean", parameters={"statistics_memory": "300kB"})
    text = describe_plan(config, device="cpu")
    assert "QR" not in text and "SVD" not in text and "dry run: nothing written" in text
    for name, p in zip(DEMO_ADAPTERS, prompts):
        assert f"    '{name}': up to 64 prompt(s) from {p} (seed 0)" in text
    assert "no teacher pass, no training), hooks on the inputs of 14 module(s)" in text
    from mergekit_lite.units import format_size

    nbytes = 0
    with prepare(config) as prepared:
        for tensor in prepared.plan.tensors:
            if tensor.touched:
                rows, cols = tensor.info.shape
                rank = sum(item.module.rank for items in tensor.by_adapter for item in items)
                nbytes += (cols * cols + rank * cols) * 8  # Linear: d_in = columns
                assert f"{tensor.name} [{rows}x{cols}]: Gram {cols}x{cols}, rank {rank} (3 adapter(s))" in text
    # checkpoint order, per layer down 143360 B, gate/up/k/o/q/v 38912 B each, packed into 300 kB:
    # [down0 gate0 up0 k0 o0] [q0 v0 down1 gate1 up1] [k1 o1 q1 v1]
    assert f"float64 Gram sums up to {format_size(nbytes)}" in text and "budget 300kB: about 3 round(s)" in text
    assert "one Cholesky per distinct input (float64), then per tensor ΔW* as factors of rank Σrᵢ" in text
