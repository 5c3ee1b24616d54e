"""learned: merge coefficients λᵢ,ₜ fitted on each adapter's own answers to a few unlabeled prompts (issue #24).

ΔW of tensor t = Σᵢ λᵢ,ₜ τᵢ. The λ are trained (Adam) so that the merged model continues each adapter's
calibration prompts as that adapter alone does (`loss: ce` on its greedy tokens, or `kl` to its distributions);
only the λ move, the base and the adapters stay frozen (`mergekit_lite.calibration`). The merge itself then
streams through the linear path with per-tensor coefficients: the same bytes as `task_arithmetic` (λ 1) given
the learned λ as per-tensor weights, written to `coefficients.json` beside the output.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MergeConfigError
from .registry import Calibrated, CalibratedPhase, CalibrationRun, LinearPhase, MergeMethod, Param, register

logger = logging.getLogger(__name__)

COEFFICIENTS_FILE = "coefficients.json"
HEATMAP_FILE = "coefficients.png"
LOSS_FILE = "coefficients_loss.png"


def _calibration_params() -> tuple[Param, ...]:
    from ..calibration import CALIBRATION_PARAMS

    return CALIBRATION_PARAMS


def per_tensor_coefficients(weights: Sequence[float], params: Mapping[str, Any]) -> list[float]:
    """cᵢ,ₜ = wᵢ,ₜ: the calibrated weights are the coefficients (before calibration, the config's weights)."""
    return [float(w) for w in weights]


def _positive_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive whole number" if low > 0 else "a whole number ≥ 0"
        raise MergeConfigError(f"parameters: '{name}' must be {what}, got {value!r}")


def _validate(weights: Sequence[Any], params: Mapping[str, Any], per_adapter: Sequence[Mapping[str, Any]]) -> None:
    """Config-time checks: counts, the held-out share, init_method, every adapter's calibration keys."""
    from ..calibration import check_calibration

    _positive_int(params["steps"], "steps", 0)
    _positive_int(params["batch_size"], "batch_size", 1)
    _positive_int(params["max_new_tokens"], "max_new_tokens", 1)
    if not 0 <= params["holdout"] < 1:
        raise MergeConfigError(f"parameters: 'holdout' must be in [0, 1), got {params['holdout']!r}")
    init_method = params.get("init_method")
    if init_method is not None:
        from .registry import REGISTRY

        method = REGISTRY.get(init_method)
        if method is None or not method.is_linear or method.calibrated is not None:
            linear = sorted(n for n, m in REGISTRY.items() if m.is_linear and m.calibrated is None)
            raise MergeConfigError(f"parameters: 'init_method' starts λ from a linear method's coefficients (one "
                                   f"of: {', '.join(linear)}), got {init_method!r}")
    check_calibration(per_adapter)


def calibrate(prepared: Any, run: CalibrationRun) -> Calibrated:
    """Load the branches, compute the teachers (cached), fit λ, and hand the linear path per-tensor weights."""
    import time

    import torch

    from ..calibration import load_calibration
    from ..calibration.fit import fit
    from ..engine.device import single_threaded_torch

    config = prepared.config
    params = config.global_params
    loss = params["loss"]
    started = time.perf_counter()
    with single_threaded_torch():  # measured on the shared 2-core machine: 1 thread ~9x faster than 2 under load
        calibration = load_calibration(prepared, device=run.device, seed=config.seed,
                                       room=params["max_new_tokens"], cache_dir=run.cache_dir,
                                       progress=run.progress)
        try:
            model = calibration.model
            loaded = time.perf_counter()
            teachers = calibration.teachers(params["max_new_tokens"], log_probs=loss == "kl",
                                            batch_size=params["batch_size"])
            taught = time.perf_counter()
            init = initial_coefficients(model.tensors, config)
            result = fit(model, teachers, torch.tensor(init), loss=loss, granularity=params["granularity"],
                         steps=params["steps"], lr=params["lr"], batch_size=params["batch_size"], seed=config.seed,
                         holdout=params["holdout"], progress=run.progress)
            continuation_tokens = [sum(map(len, t.continuations)) for t in teachers]
        finally:
            calibration.close()
    labels = [a.label for a in prepared.adapters]
    values = [[float(v) for v in row] for row in result.coefficients.cpu().tolist()]
    record = _record(config, labels, model.tensors, values, result, calibration, continuation_tokens)
    record["timings"] = {"prompts_and_model_s": round(loaded - started, 3), "teachers_s": round(taught - loaded, 3),
                         "fit_s": round(result.seconds, 3),
                         "per_step_s": round(result.seconds / params["steps"], 4) if params["steps"] else None}
    files = {COEFFICIENTS_FILE: (json.dumps(record, indent=1) + "\n").encode()}
    files.update(_pictures(record))
    held = ""
    if result.held_out is not None:
        held = f"held-out {loss} loss {result.held_out[0]:.4f} -> {result.held_out[1]:.4f}"
        logger.info("learned: %s over %d held-out prompts", held, sum(result.held_out_count))
    summary = (f"learned {len(values)}×{len(model.tensors)} coefficients in {result.seconds:.1f} s "
               f"({params['steps']} steps" + (f", {held}" if held else "") + ")")
    return Calibrated(weights=tuple(weight_filters(model.tensors, row) for row in values), params={},
                      side_files=files, card_section=card_section(record), summary=summary)


def initial_coefficients(tensors: Sequence[str], config: Any) -> list[list[float]]:
    """λ⁰ (adapters × tensors): `init`·wᵢ,ₜ, or `init_method`'s linear coefficients of the tensor's weights."""
    from .gradients import layer_count, layer_position, resolve_tensor
    from .registry import REGISTRY

    params = config.global_params
    method = REGISTRY.get(params["init_method"]) if params.get("init_method") else None
    n_layers = layer_count(tensors)
    columns = []
    for name in tensors:
        weights = resolve_tensor(name, layer_position(name, n_layers), config.weights, {}, [{}] * len(config.inputs))
        if method is None:
            columns.append([params["init"] * w for w in weights.weights])
        else:
            own = {p.name: p.default for p in method.params}
            columns.append(list(method.coefficients(list(weights.weights), own)))
    return [[columns[t][i] for t in range(len(tensors))] for i in range(len(config.inputs))]


def weight_filters(tensors: Sequence[str], values: Sequence[float]) -> list[dict[str, Any]]:
    """One input's per-tensor weights as a filter list the engine evaluates per tensor (SEMANTICS §3d): each
    tensor's full name, longest first, so the first filter contained in a name is that name itself (a shorter
    name can be a substring of a longer one, never the reverse), then 0 for tensors the input does not change."""
    pairs = sorted(zip(tensors, values), key=lambda item: -len(item[0]))
    return [*({"filter": name, "value": value} for name, value in pairs), {"value": 0.0}]


def _record(config: Any, labels: list[str], tensors: list[str], values: list[list[float]], result: Any,
            calibration: Any, continuation_tokens: list[int]) -> dict[str, Any]:
    params = config.global_params
    return {
        "method": "learned",
        "parameters": {k: params[k] for k in ("loss", "granularity", "steps", "lr", "batch_size", "init",
                                              "init_method", "max_new_tokens", "holdout")},
        "seed": config.seed,
        "adapters": labels,
        "calibration": {label: {"source": source.describe(), "prompts": len(prompts), "teacher_tokens": tokens}
                        for label, source, prompts, tokens in zip(labels, calibration.sources, calibration.prompts,
                                                                  continuation_tokens)},
        "coefficients": {name: {label: values[i][t] for i, label in enumerate(labels)}
                         for t, name in enumerate(tensors)},
        "held_out_loss": None if result.held_out is None else {
            "before": result.held_out[0], "after": result.held_out[1],
            "prompts": dict(zip(labels, result.held_out_count))},
        "train_loss": result.losses,
        "seconds": round(result.seconds, 3),
    }


def card_section(record: Mapping[str, Any]) -> str:
    """The card's 'Learned coefficients' section: data, fit, held-out loss, λ per adapter (mean, range)."""
    params = record["parameters"]
    labels = record["adapters"]
    lines = ["## Learned coefficients", "",
             f"λ fitted with loss `{params['loss']}`, granularity `{params['granularity']}`, {params['steps']} Adam "
             f"steps (lr {params['lr']:g}, batch {params['batch_size']}) from λ⁰ = "
             f"{params['init_method'] or params['init']}, seed {record['seed']}, on each adapter's own greedy answers "
             f"(≤ {params['max_new_tokens']} tokens) to its calibration prompts. Per tensor and adapter in "
             f"`{COEFFICIENTS_FILE}`; picture `{HEATMAP_FILE}`, loss curve `{LOSS_FILE}`.", ""]
    held = record.get("held_out_loss")
    if held:
        lines += [f"Held-out loss ({sum(held['prompts'].values())} prompts never trained on): "
                  f"{held['before']:.4f} → {held['after']:.4f}.", ""]
    lines += ["| adapter | calibration | prompts | mean λ | min λ | max λ |", "|---|---|---:|---:|---:|---:|"]
    for label in labels:
        column = [row[label] for row in record["coefficients"].values()]
        cal = record["calibration"][label]
        mean = sum(column) / len(column) if column else math.nan
        lines.append(f"| {label} | `{cal['source']}` | {cal['prompts']} | {mean:.3f} | {min(column, default=math.nan):.3f} | "
                     f"{max(column, default=math.nan):.3f} |")
    return "\n".join(lines) + "\n"


def _pictures(record: Mapping[str, Any]) -> dict[str, bytes]:
    """The heatmap (layers × modules, one panel per adapter) and the loss curve, as PNG bytes (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        logger.info("learned: matplotlib is not installed; no pictures (pip install matplotlib)")
        return {}
    from .gradients import LAYER_INDEX

    labels = record["adapters"]
    rows: list[Any] = []
    modules: list[str] = []
    cells: dict[tuple[Any, str], str] = {}
    for name in record["coefficients"]:
        match = LAYER_INDEX.search(name)
        row: Any = int(match.group(1)) if match else "other"
        module = (name[match.end():] if match else name).removesuffix(".weight")
        if row not in rows:
            rows.append(row)
        if module not in modules:
            modules.append(module)
        cells[(row, module)] = name
    every = [v for row in record["coefficients"].values() for v in row.values()]
    low, high = min(every), max(every)
    centre = record["parameters"]["init"] if record["parameters"]["init_method"] is None else (low + high) / 2
    norm = TwoSlopeNorm(vcenter=centre, vmin=min(low, centre - 1e-6), vmax=max(high, centre + 1e-6))
    figure, axes = plt.subplots(1, len(labels), figsize=(1.2 + 0.45 * len(modules) * len(labels) + 1.5,
                                                          1.2 + 0.3 * len(rows)), squeeze=False, layout="constrained")
    image = None
    for panel, label in zip(axes[0], labels):
        grid = [[record["coefficients"][cells[(r, m)]][label] if (r, m) in cells else math.nan for m in modules]
                for r in rows]
        image = panel.imshow(grid, cmap="coolwarm", norm=norm, aspect="auto")
        panel.set_title(label, fontsize=9)
        panel.set_xticks(range(len(modules)), [m.rsplit(".", 1)[-1] for m in modules], rotation=90, fontsize=7)
        panel.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    axes[0][0].set_ylabel("layer")
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="λ")
    pictures = {HEATMAP_FILE: _png(figure, plt)}
    figure, axis = plt.subplots(figsize=(5, 3), layout="constrained")
    losses = record["train_loss"]
    if losses:
        axis.plot(range(1, len(losses) + 1), losses, lw=1, label="training batch")
    held = record.get("held_out_loss")
    if held:
        axis.scatter([0, len(losses)], [held["before"], held["after"]], color="C3", zorder=3, label="held out")
    axis.set_xlabel("step")
    axis.set_ylabel(f"{record['parameters']['loss']} loss")
    axis.legend(fontsize=8)
    pictures[LOSS_FILE] = _png(figure, plt)
    return pictures


def _png(figure: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def describe(prepared: Any) -> list[str]:
    """The dry run's account of the calibration: the prompts, the teacher pass, the training and how many λ."""
    from ..calibration.dry_run import model_line, source_lines
    from .gradients import LAYER_INDEX

    config = prepared.config
    params = config.global_params
    tensors = [t.name for t in prepared.plan.tensors if t.touched]
    per_adapter = {"tensor": len(tensors), "adapter": 1 if tensors else 0,
                   "layer": len({(m.group(1) if (m := LAYER_INDEX.search(n)) else "outside") for n in tensors})}
    count = len(config.inputs) * per_adapter[params["granularity"]]
    start = (f"{params['init_method']}'s coefficients" if params.get("init_method") else
             f"λ⁰ = {params['init']:g}·wᵢ")
    targets = "greedy answers" if params["loss"] == "ce" else "greedy answers and their distributions"
    return [model_line(), *source_lines(config, params["holdout"]),
            f"  teacher pass: each adapter alone answers its prompts greedily, ≤ {params['max_new_tokens']} new "
            f"token(s) each ({targets}; cached by content, reused by the next run)",
            f"  training: {params['steps']} Adam step(s) of {params['batch_size']} prompt(s) per adapter "
            f"(lr {params['lr']:g}, loss {params['loss']}) on {count} λ ({len(config.inputs)} adapter(s) × "
            f"{per_adapter[params['granularity']]}, granularity {params['granularity']}) from {start}; only λ moves",
            f"  then: the linear stream of task arithmetic with the learned λ as per-tensor weights "
            f"({len(tensors)} tensor(s)); λ in {COEFFICIENTS_FILE}"]


LEARNED = register(
    MergeMethod(
        name="learned",
        display_name="Learned coefficients",
        paper_url="https://arxiv.org/abs/2310.02575",
        summary="τ = Σᵢ λᵢ,ₜ τᵢ, one λ per adapter and tensor fitted so the merge answers each adapter's calibration "
                "prompts as that adapter does",
        params=(
            Param("loss", "ce", str, "ce: cross-entropy on each adapter's greedy answers; kl: KL to its distributions",
                  choices=("ce", "kl")),
            Param("granularity", "tensor", str, "one λ per adapter and tensor, layer, or adapter",
                  choices=("tensor", "layer", "adapter")),
            Param("steps", 150, int, "Adam steps (0: λ stays at its start)"),
            Param("lr", 0.02, float, "Adam learning rate", interval=(0.0, 1e3)),
            Param("batch_size", 16, int, "prompts per step (drawn from all adapters)"),
            Param("init", 0.5, float, "λ⁰ = init · wᵢ"),
            Param("init_method", None, str, "start from a linear method's coefficients instead (e.g. task_arithmetic)"),
            Param("max_new_tokens", 16, int, "length of each adapter's greedy answer"),
            Param("holdout", 0.1, float, "share of each adapter's prompts held out (their loss is reported)"),
            *_calibration_params(),
        ),
        phase=LinearPhase(per_tensor_coefficients),
        validate=_validate,
        calibrated=CalibratedPhase(calibrate, describe=describe),
    )
)
