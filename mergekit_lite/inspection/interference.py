"""The interference matrix of `merge inspect`: what adding adapter j costs adapter i, measured on calibration prompts.

Each adapter i continues its own calibration prompts greedily (its teacher targets, `calibration.teachers`).
On those continuations, the log-likelihood per token (nats, teacher-forced as `merge eval` scores an answer) is
measured under the base, base + τᵢ, base + τⱼ and base + τᵢ + τⱼ for every j ≠ i, with the base loaded once and the
adapters attached as frozen low-rank branches (`calibration.model.BranchedModel`): coefficients 1 for i, 1 for j,
0 else; no checkpoint is written. Then

- gain(i)       = LL_i(base + τᵢ) − LL_i(base)            (what adapter i adds on its own task; > 0)
- cost(i, j)    = LL_i(base + τᵢ) − LL_i(base + τᵢ + τⱼ)   (nats per token that adding j costs i; < 0: j helps)
- share(i, j)   = cost(i, j) / gain(i)                     (the part of i's gain that adding j takes away)

Starting weights: for every ordered pair the same LL is measured with weights (a, b) on a small grid
(`WEIGHT_GRID`), and the per-adapter weights w minimizing the largest pairwise loss
(LL_i(base + τᵢ) − LL_i(base + wᵢτᵢ + wⱼτⱼ)) / gain(i) are chosen on that measured table; the n-way merge at those
weights and at weights 1 is then measured too (`merged_kept`). They are written as a task_arithmetic config
(`suggested_merge.yaml`) to run, evaluate or sweep from.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calibration import CALIBRATION_PARAMS
from ..errors import MergeConfigError

logger = logging.getLogger(__name__)

#: the per-adapter keys that carry calibration data
CALIBRATION_KEYS = tuple(p.name for p in CALIBRATION_PARAMS)
#: weights tried per adapter in each pairwise merge when choosing starting weights (1.0: the matrix itself)
WEIGHT_GRID = (0.25, 0.5, 0.75, 1.0)
#: a gain (nats per token) at or below this is no gain: the share is undefined (null)
MIN_GAIN = 1e-6
#: share of a victim's gain from which an adapter "costs" it (verdict)
COSTLY_SHARE = 0.25
#: largest share under which the adapters count as barely interfering
HARMLESS_SHARE = 0.1
#: continuation length of the teachers (the calibration package's default)
MAX_NEW_TOKENS = 16
#: the order of `interference.timings` in inspect.json
TIMING_ORDER = ("load_s", "teachers_s", "matrix_s", "weights_s", "total_s")
#: batch size of the teachers' greedy generation
TEACHER_BATCH = 16
#: the suggested config's file name in the report folder
SUGGESTED_YAML = "suggested_merge.yaml"
#: exhaustive search over the grid up to this many weight vectors, coordinate descent beyond
EXHAUSTIVE_LIMIT = 20000


def split_calibration(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """A config mapping without its calibration keys, and each adapter's calibration keys (None: no `calibration`).

    Used for a config whose method takes no calibration parameters (inspect's default task_arithmetic, or any
    data-free method): the keys describe the adapters' data, not the method, so inspect reads them itself."""
    data = dict(data)
    common = {}
    parameters = data.get("parameters")
    if isinstance(parameters, Mapping):
        common = {k: v for k, v in parameters.items() if k in CALIBRATION_KEYS}
        if common:
            data["parameters"] = {k: v for k, v in parameters.items() if k not in CALIBRATION_KEYS}
    entries = data.get("adapters")
    own: list[dict[str, Any]] = []
    if isinstance(entries, list):
        stripped = []
        for entry in entries:
            if isinstance(entry, Mapping):
                own.append({k: v for k, v in entry.items() if k in CALIBRATION_KEYS})
                stripped.append({k: v for k, v in entry.items() if k not in CALIBRATION_KEYS})
            else:
                own.append({})
                stripped.append(entry)
        data["adapters"] = stripped
    if not common and not any(own):
        return data, None
    return data, [{**common, **entry} for entry in own]


def calibration_specs(config: Any, extra: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Each input's calibration keys: from the method's own parameters when it takes them (learned, regmean), else
    from those inspect set aside (`extra`); None when no input names calibration data."""
    params = config.adapter_params
    if any(p.get("calibration") is not None for p in params):
        specs = [{k: p.get(k) for k in CALIBRATION_KEYS if p.get(k) is not None} for p in params]
    elif extra is not None:
        specs = [dict(e) for e in extra]
        specs += [{} for _ in range(len(config.inputs) - len(specs))]
    else:
        return None
    if not any(s.get("calibration") is not None for s in specs):
        return None
    return specs


def sources_of(config: Any, specs: Sequence[Mapping[str, Any]], size: int | None) -> list[Any]:
    """Every input's CalibrationSource (checked: one line naming the entry), `size` overriding calibration_size."""
    from ..calibration import calibration_sources

    return calibration_sources(config, specs, size)


def source_names(config: Any, sources: Sequence[Any]) -> list[str]:
    """Each source as the report names it, without this machine's paths: a file relative to the config's folder,
    a task by name."""
    names = []
    for source in sources:
        if source.kind == "task" and not source.reference.endswith((".yaml", ".yml")):
            names.append(source.describe())
        else:
            names.append(os.path.relpath(source.reference, config.config_dir))
    return names


# ------------------------------------------------------------------------------------------------- measuring


@dataclass
class Interference:
    """Log-likelihoods per token (nats) of each adapter's teacher continuations under the models measured."""

    labels: list[str]
    sources: list[str]
    prompts: list[int]
    tokens: list[int]
    #: LL_i(base)
    base_ll: list[float]
    #: [i][j]: LL_i(base + τⱼ); the diagonal is LL_i(base + τᵢ)
    alone_ll: list[list[float]]
    #: [i][j]: LL_i(base + τᵢ + τⱼ); the diagonal is LL_i(base + τᵢ)
    pair_ll: list[list[float]]
    device: str
    dtype: str
    batch_size: int
    max_new_tokens: int
    #: (i, j) -> [a][b]: LL_i(base + g_a τᵢ + g_b τⱼ) over WEIGHT_GRID (filled by `measure_grid`)
    grid: dict[tuple[int, int], list[list[float]]] = field(default_factory=dict)
    weights: list[float] | None = None
    #: "ones" / "suggested" -> LL_i of the n-way merge Σ wₖτₖ on adapter i's continuations
    merged_ll: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: the teachers' examples (TeacherSet per adapter) the numbers were measured on (not reported)
    examples: list[Any] = field(default_factory=list, repr=False)

    def own(self, i: int) -> float:
        return self.pair_ll[i][i]

    def gain(self, i: int) -> float:
        return self.own(i) - self.base_ll[i]

    def cost(self, i: int, j: int) -> float:
        return 0.0 if i == j else self.own(i) - self.pair_ll[i][j]

    def share(self, i: int, j: int) -> float | None:
        gain = self.gain(i)
        return None if gain <= MIN_GAIN else self.cost(i, j) / gain

    def kept(self, i: int, ll: float) -> float | None:
        """The part of i's gain a model with log-likelihood `ll` on i's continuations keeps."""
        gain = self.gain(i)
        return None if gain <= MIN_GAIN else (ll - self.base_ll[i]) / gain

    def pair_loss(self, i: int, j: int, a: int, b: int) -> float | None:
        """Share of i's gain lost in the pairwise merge g_a τᵢ + g_b τⱼ (grid indices a, b)."""
        gain = self.gain(i)
        return None if gain <= MIN_GAIN else (self.own(i) - self.grid[(i, j)][a][b]) / gain


class Scorer:
    """Teacher-forced log-likelihood of each adapter's continuations at any coefficients of the branched model."""

    def __init__(self, model: Any, examples: Sequence[Any], batch_size: int) -> None:
        from ..calibration.batches import chunks
        from ..calibration.teachers import training_batch

        self.model = model
        self.batches = [[training_batch(e, list(rows), model.pad_id, 1) for rows in chunks(len(e), batch_size)]
                        for e in examples]
        self.tokens = [sum(int((b.targets != -100).sum()) for b in batches) for batches in self.batches]

    def ll(self, index: int, coefficients: torch.Tensor) -> float:
        """Mean log-probability per continuation token (nats) of adapter `index`'s examples."""
        from ..calibration.fit import rows_loss

        total = 0.0
        with torch.no_grad(), self.model.using(coefficients):
            for batch in self.batches[index]:
                total -= float(rows_loss(self.model, batch, "ce").double().sum())
        return total / max(1, self.tokens[index])

    def coefficients(self, weights: Mapping[int, float]) -> torch.Tensor:
        """Adapters × tensors coefficients: weights[k] on adapter k's row, 0 elsewhere."""
        model = self.model
        c = torch.zeros(model.n_adapters, len(model.tensors), device=model.device, dtype=model.lambda_dtype)
        for k, w in weights.items():
            c[k] = w
        return c


def read_prompts(sources: Sequence[Any], seed: int) -> list[list[str]]:
    """Every adapter's prompts, drawn by `seed` (read before any model loads: a bad file is refused first)."""
    from ..calibration.prompts import load_prompts

    return [load_prompts(source, seed) for source in sources]


def measure(prepared: Any, sources: Sequence[Any], *, device: torch.device | str = "cpu", seed: int = 0,
            batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS, weights: bool = True,
            progress: bool = False, dtype: torch.dtype = torch.float32,
            texts: Sequence[Sequence[str]] | None = None) -> Interference:
    """Load the base once with the adapters as branches, build the teachers, measure the matrix (and the grid and
    the suggested weights when `weights`). `texts`: the prompts `read_prompts` already read."""
    from ..calibration import load_calibration

    started = time.perf_counter()
    calibration = load_calibration(prepared, device=device, seed=seed, room=max_new_tokens, dtype=dtype,
                                   sources=sources, texts=texts)
    model = calibration.model
    try:
        loaded = time.perf_counter()
        # the teachers in fixed batches (the scoring batch size must change no number, not even a greedy tie)
        examples = calibration.teachers(max_new_tokens=max_new_tokens, batch_size=TEACHER_BATCH)
        taught = time.perf_counter()
        result = _matrix(model, examples, [s.describe() for s in sources], batch_size, max_new_tokens, weights,
                         progress)
        result.timings.update({"load_s": loaded - started, "teachers_s": taught - loaded})
        result.timings["total_s"] = time.perf_counter() - started
        return result
    finally:
        model.close()


def _matrix(model: Any, examples: Sequence[Any], sources: list[str], batch_size: int, max_new_tokens: int,
            weights: bool, progress: bool) -> Interference:
    from tqdm.auto import tqdm

    n = model.n_adapters
    scorer = Scorer(model, examples, batch_size)
    grid_points = len(WEIGHT_GRID) ** 2 - 1 if weights and n >= 2 else 0
    total = n * (2 + 2 * (n - 1)) + n * (n - 1) * grid_points + (2 * n if weights and n >= 2 else 0)
    bar = tqdm(total=total, unit="pass", desc="interference", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()

    def ll(i: int, w: Mapping[int, float]) -> float:
        value = scorer.ll(i, scorer.coefficients(w))
        bar.update(1)
        return value

    try:
        base = [ll(i, {}) for i in range(n)]
        alone = [[ll(i, {j: 1.0}) for j in range(n)] for i in range(n)]
        pair = [[alone[i][i] if i == j else ll(i, {i: 1.0, j: 1.0}) for j in range(n)] for i in range(n)]
        result = Interference(list(model.labels), sources, [len(e) for e in examples], scorer.tokens, base, alone,
                              pair, model.device.type, str(model.dtype).removeprefix("torch."), batch_size,
                              max_new_tokens, examples=list(examples))
        result.timings["matrix_s"] = time.perf_counter() - started
        if weights and n >= 2:
            started = time.perf_counter()
            one = WEIGHT_GRID.index(1.0)
            for i, j in itertools.permutations(range(n), 2):
                result.grid[(i, j)] = [[pair[i][j] if (a, b) == (one, one) else ll(i, {i: ga, j: gb})
                                        for b, gb in enumerate(WEIGHT_GRID)] for a, ga in enumerate(WEIGHT_GRID)]
            result.weights = choose_weights(result)
            result.merged_ll["ones"] = [ll(i, dict.fromkeys(range(n), 1.0)) for i in range(n)]
            result.merged_ll["suggested"] = [ll(i, dict(enumerate(result.weights))) for i in range(n)]
            result.timings["weights_s"] = time.perf_counter() - started
    finally:
        bar.close()
    return result


# ------------------------------------------------------------------------------------------------ weights


def _objective(result: Interference, choice: Sequence[int]) -> tuple[float, float]:
    """(largest, mean) pairwise loss share at grid indices `choice`, over victims with a gain."""
    losses = [loss for i, j in itertools.permutations(range(len(choice)), 2)
              if (loss := result.pair_loss(i, j, choice[i], choice[j])) is not None]
    if not losses:
        return (0.0, 0.0)
    return (max(losses), sum(losses) / len(losses))


def choose_weights(result: Interference) -> list[float]:
    """The grid weights minimizing the largest measured pairwise loss (then the mean loss, then preferring larger
    weights): exhaustive up to EXHAUSTIVE_LIMIT vectors, coordinate descent from all-ones beyond."""
    n, g = len(result.labels), len(WEIGHT_GRID)

    def key(choice: Sequence[int]) -> tuple[float, float, int]:
        worst, mean = _objective(result, choice)
        return (round(worst, 6), round(mean, 6), -sum(choice))

    if g ** n <= EXHAUSTIVE_LIMIT:
        best = min(itertools.product(range(g), repeat=n), key=key)
    else:
        best = [g - 1] * n
        for _ in range(4):
            before = list(best)
            for k in range(n):
                best = min(([*best[:k], a, *best[k + 1:]] for a in range(g)), key=key)
            if best == before:
                break
    return [WEIGHT_GRID[a] for a in best]


def suggested_loss(result: Interference) -> tuple[float, float]:
    """(largest, mean) pairwise loss share at the suggested weights."""
    assert result.weights is not None
    return _objective(result, [WEIGHT_GRID.index(w) for w in result.weights])


# ------------------------------------------------------------------------------------------------ reporting


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def offender(result: Interference) -> tuple[int, float] | None:
    """The adapter whose addition costs the others most (mean share over the victims with a gain)."""
    n = len(result.labels)
    best = None
    for j in range(n):
        shares = [s for i in range(n) if i != j and (s := result.share(i, j)) is not None]
        if shares:
            mean = sum(shares) / len(shares)
            if best is None or mean > best[1]:
                best = (j, mean)
    return best


def findings(result: Interference, config_name: str | None) -> list[dict[str, Any]]:
    """The measured verdict: worst offender, harmless adapters, a victim that gains nothing, suggested weights."""
    n, labels = len(result.labels), result.labels
    out: list[dict[str, Any]] = []
    for i in range(n):
        if result.gain(i) <= MIN_GAIN:
            out.append({"finding": "no_gain", "text": (
                f"'{labels[i]}' does not raise the likelihood of its own continuations over the base (gain "
                f"{result.gain(i):+.3f} nats/token): are its calibration prompts from its task?"),
                "figures": {"adapter": labels[i], "gain": _num(result.gain(i))}})
    if n == 1:
        out.append({"finding": "single_adapter", "text": (
            f"one adapter: nothing to interfere with (its gain on its own continuations: {result.gain(0):.3f} "
            "nats/token)"), "figures": {"gain": _num(result.gain(0))}})
    worst = offender(result)
    shares = [s for i, j in itertools.permutations(range(n), 2) if (s := result.share(i, j)) is not None]
    if worst is not None and shares:
        j, mean = worst
        costly = [(result.share(i, j), i) for i in range(n) if i != j and (result.share(i, j) or 0) >= COSTLY_SHARE]
        if max(shares) < HARMLESS_SHARE:
            out.append({"finding": "little_interference", "text": (
                f"the adapters barely interfere on their prompts: adding any one costs another at most "
                f"{max(shares):.0%} of its gain; a plain sum (task_arithmetic, λ 1) keeps each adapter's gain"),
                "figures": {"max_share": max(shares)}})
        elif costly:
            parts = " and ".join(f"'{labels[i]}' {s:.0%}" for s, i in sorted(costly, reverse=True))
            advice = "lower its weight, or use `method: learned`"
            if result.weights:
                others = [w for k, w in enumerate(result.weights) if k != j]
                if result.weights[j] < min(others):
                    advice = (f"lower its weight (suggested {result.weights[j]:g}, the others "
                              f"{'/'.join(f'{w:g}' for w in others)}), or use `method: learned`")
                elif len(set(result.weights)) == 1:
                    advice = (f"lower its weight, or use `method: learned`; the others cost each other too, so the "
                              f"suggested weights lower every adapter alike (to {result.weights[j]:g})")
            out.append({"finding": "costly_adapter", "text": (
                f"'{labels[j]}' costs {parts} of their gains when added (mean {mean:.0%} over the others); "
                f"{advice}"),
                "figures": {"adapter": labels[j], "mean_share": mean,
                            **{labels[i]: s for s, i in costly}}})
        else:
            out.append({"finding": "moderate_interference", "text": (
                f"moderate interference: the costliest adapter, '{labels[j]}', takes {mean:.0%} of the others' "
                f"gains on average (no pair {COSTLY_SHARE:.0%} or more)"), "figures": {"adapter": labels[j],
                                                                                   "mean_share": mean}})
        helped = [(result.share(i, k), i, k) for i, k in itertools.permutations(range(n), 2)
                  if (result.share(i, k) or 0) < -HARMLESS_SHARE]
        if helped:
            s, i, k = min(helped)
            out.append({"finding": "helping_adapter", "text": (
                f"adding '{labels[k]}' raises the likelihood of the continuations of '{labels[i]}' (by {-s:.0%} of "
                "its gain): they share what they learned"), "figures": {"adapter": labels[k], "victim": labels[i], "share": s}})
    if result.weights is not None:
        worst_loss, mean_loss = suggested_loss(result)
        ones, chosen = result.merged_ll.get("ones"), result.merged_ll.get("suggested")
        kept = ""
        figures: dict[str, Any] = {"max_pair_loss": worst_loss, "mean_pair_loss": mean_loss}
        if ones and chosen:
            at_ones = [result.kept(i, v) for i, v in enumerate(ones)]
            at_chosen = [result.kept(i, v) for i, v in enumerate(chosen)]
            if all(v is not None for v in at_ones + at_chosen):
                mean_ones = sum(at_ones) / n  # type: ignore[arg-type]
                mean_chosen = sum(at_chosen) / n  # type: ignore[arg-type]
                kept = (f"; the {n}-way merge keeps {mean_chosen:.0%} of the gains on average at these weights, "
                        f"{mean_ones:.0%} at weights 1 (measured)")
                figures.update({"merged_kept_suggested": mean_chosen, "merged_kept_ones": mean_ones})
        where = f" ({config_name}: run, `merge eval` or sweep from it)" if config_name else ""
        weights = ", ".join(f"{label} {w:g}" for label, w in zip(labels, result.weights))
        out.append({"finding": "suggested_weights", "text": (
            f"starting weights {weights} keep every pairwise merge's loss under {math.ceil(worst_loss * 100)}% of "
            f"each adapter's gain (measured on a {'/'.join(f'{g:g}' for g in WEIGHT_GRID)} grid){kept}{where}"),
            "figures": {**figures, **{label: w for label, w in zip(labels, result.weights)}}})
    return out


def report_json(result: Interference, config_name: str | None) -> dict[str, Any]:
    """The `interference` object of inspect.json (keys: INTERFERENCE_KEYS in report.py)."""
    n = len(result.labels)

    def matrix(fn: Any) -> list[list[float | None]]:
        return [[_num(fn(i, j)) for j in range(n)] for i in range(n)]

    worst = offender(result)
    suggested = None
    if result.weights is not None:
        worst_loss, mean_loss = suggested_loss(result)
        suggested = {
            "weights": dict(zip(result.labels, result.weights)),
            "grid": list(WEIGHT_GRID),
            "max_pair_loss": _num(worst_loss), "mean_pair_loss": _num(mean_loss),
            "pair_loss": matrix(lambda i, j: None if i == j else result.pair_loss(
                i, j, WEIGHT_GRID.index(result.weights[i]), WEIGHT_GRID.index(result.weights[j]))),  # type: ignore
            "merged_kept": {key: [_num(result.kept(i, v)) for i, v in enumerate(values)]
                            for key, values in result.merged_ll.items()},
            "config": config_name,
        }
    return {
        "adapters": list(result.labels),
        "calibration": [{"adapter": label, "source": source, "prompts": p, "tokens": t}
                        for label, source, p, t in zip(result.labels, result.sources, result.prompts, result.tokens)],
        "settings": {"device": result.device, "dtype": result.dtype, "batch_size": result.batch_size,
                     "max_new_tokens": result.max_new_tokens},
        "base_ll": [_num(v) for v in result.base_ll],
        "own_ll": [_num(result.own(i)) for i in range(n)],
        "gain": [_num(result.gain(i)) for i in range(n)],
        "alone_ll": matrix(lambda i, j: result.alone_ll[i][j]),
        "pair_ll": matrix(lambda i, j: result.pair_ll[i][j]),
        "cost": matrix(result.cost),
        "cost_share": matrix(lambda i, j: None if i == j else result.share(i, j)),
        "offender": None if worst is None else {"adapter": result.labels[worst[0]], "mean_share": _num(worst[1])},
        "suggested": suggested,
        "verdict": findings(result, config_name),
        "timings": {k: round(result.timings[k], 4) for k in TIMING_ORDER if k in result.timings},
    }


def suggested_config(config: Any, weights: Sequence[float], folder: Path, header: str) -> str:
    """A task_arithmetic config with per-adapter `weights`, its paths relative to `folder` (where it is written);
    its output beside the report folder, never in it (the next inspect replaces that folder whole)."""
    import yaml

    from ..hub.resolve import hub_reference

    def relative(path: str) -> str:
        if hub_reference(config, path) is not None:
            return path
        return os.path.relpath(config.resolve_path(path), folder)

    data = config.to_dict()
    out: dict[str, Any] = {"base_model": relative(data["base_model"]), "method": "task_arithmetic",
                           "parameters": {"lambda": 1.0}, "adapters": []}
    for entry, weight in zip(data.get("adapters", []), weights):
        row = {"path": relative(entry["path"])}
        if entry.get("name"):
            row["name"] = entry["name"]
        row["weight"] = float(weight)
        out["adapters"].append(row)
    out["output"] = {"path": os.path.relpath(folder.parent / f"{folder.name}_suggested_merge", folder),
                     "dtype": (data.get("output") or {}).get("dtype") or "float32"}
    if data.get("seed"):
        out["seed"] = data["seed"]
    if data.get("eval"):
        out["eval"] = {k: v for k, v in data["eval"].items() if v is not None and v is not False}
    return header + yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def no_calibration_line() -> str:
    """What inspect says when the config names no calibration data."""
    return ("no calibration data: give each adapter `calibration: prompts.jsonl` (a few dozen unlabeled prompts of "
            "its task, or an lm-eval task name) and inspect also measures what adding each adapter costs the others "
            "(an interference matrix) and suggests starting weights")


def check_size(size: int | None) -> None:
    """--calibration-size must be a positive count (click checks the CLI; this checks the Python API)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise MergeConfigError(f"--calibration-size {size}: must be a positive number of prompts")


def draw_matrix(block: Mapping[str, Any], path: Path) -> None:
    """interference.png: rows the adapter whose continuations are scored, columns the adapter added; colour and
    first number the share of the row's gain lost, second the cost in nats per token."""
    import matplotlib.pyplot as plt

    names = list(block["adapters"])
    n = len(names)
    shares = [[math.nan if i == j or block["cost_share"][i][j] is None else block["cost_share"][i][j]
               for j in range(n)] for i in range(n)]
    size = max(3.6, 0.8 * n + 2.2)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    limit = max([1.0] + [abs(v) for row in shares for v in row if not math.isnan(v)])
    image = ax.imshow(shares, vmin=-limit, vmax=limit, cmap="RdBu_r")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("adapter added (j)", fontsize=9)
    ax.set_ylabel("adapter scored on its continuations (i)", fontsize=9)
    for i in range(n):
        for j in range(n):
            if i == j:
                ax.text(j, i, f"gain\n{block['gain'][i]:.2f}", ha="center", va="center", fontsize=7)
            elif block["cost"][i][j] is not None:
                share = shares[i][j]
                top = "–" if math.isnan(share) else f"{share:.0%}"
                ax.text(j, i, f"{top}\n{block['cost'][i][j]:+.2f}", ha="center", va="center", fontsize=7,
                        color="white" if not math.isnan(share) and abs(share) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of i's gain lost")
    ax.set_title("what adding j costs i (measured; nats/token below)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
