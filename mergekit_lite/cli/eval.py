"""`merge eval CONFIG... | MODEL_DIR...`: score merges against their base and adapters with lm-eval, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .errors import friendly_errors

DEFAULT_OUT = "eval_report"


@click.command(name="eval")
@click.argument("targets", metavar="CONFIG... | MODEL_DIR...", nargs=-1, required=True)
@click.option("--tasks", "tasks", multiple=True,
              help="Tasks to run: names (comma-separated or repeated) or lm-eval task YAML files/folders. "
                   "Default: the config's eval.tasks, else the offline suite (capitals, add, reverse, sentiment).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many examples per task (default: all).")
@click.option("--out", "out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
              help="Folder for the report: results/<model>.json, report.md, scores.json, chart.png.")
@click.option("--batch-size", type=click.IntRange(min=1), help="lm-eval batch size (default: eval.batch_size, else 8).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (merging and scoring).")
@click.option("--remerge", is_flag=True, help="Merge again even when a config's output folder exists (replaces it).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@friendly_errors
def eval_command(targets: tuple[str, ...], tasks: tuple[str, ...], limit: int | None, out: str,
                 batch_size: int | None, device: str, remerge: bool, no_progress: bool) -> None:
    """Evaluate merges with lm-eval, offline, and write a report.

    A CONFIG (a merge config .yaml) adds the base, each adapter alone (base + adapter through PEFT) and the
    merge it describes, merging it first when its output folder is missing. Several configs over the same base
    share those rows, so one table compares methods. A MODEL_DIR (a checkpoint folder) is scored as it is.
    """
    from ..config import load_config
    from ..evaluation.lm_eval_runner import EvalError, evaluate_models, offline, plan_models

    configs, model_dirs = [], []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            model_dirs.append(path.resolve())
        elif path.is_file():
            configs.append(load_config(path))
        else:
            raise EvalError(f"{target}: no such config file or model folder")
    merged_dirs = []
    with offline():  # merging here must not download either
        for config in configs:
            merged_dirs.append(_merged_output(config, device, remerge, progress=not no_progress))
    models, references = plan_models(configs, merged_dirs, model_dirs)
    first_eval = next((c.eval for c in configs if c.eval is not None), None)
    report = evaluate_models(
        models,
        out,
        tasks=list(tasks) or (first_eval.tasks if first_eval and first_eval.tasks else None),
        limit=limit if limit is not None else (first_eval.limit if first_eval else None),
        batch_size=batch_size or (first_eval.batch_size if first_eval else 8),
        device=device,
        references=references,
        progress=not no_progress,
    )
    click.echo(report.summary())


def _merged_output(config: Any, device: str, remerge: bool, progress: bool) -> Path:
    """The config's merged folder: reused when it was made from this very config, else merged now."""
    from ..api import CONFIG_COPY, merge
    from ..evaluation.lm_eval_runner import EvalError

    target = config.output_path
    if target.exists() and not remerge:
        if _made_from(target / CONFIG_COPY, config):
            click.echo(f"using the existing merge {target}", err=True)
            return target
        raise EvalError(
            f"{target} exists but was not made from this config: pass --remerge to merge again "
            "(it replaces the folder) or point output.path elsewhere"
        )
    result = merge(config, device=device, overwrite=remerge, progress=progress)
    click.echo(result.summary(), err=True)
    return target


def _made_from(config_copy: Path, config: Any) -> bool:
    """Whether a merged folder's recorded config is `config` (its `eval:` section aside: it changes no weight)."""
    import yaml

    if not config_copy.is_file():
        return False
    try:
        recorded = yaml.safe_load(config_copy.read_text())
    except yaml.YAMLError:
        return False
    wanted = config.to_dict()
    if not isinstance(recorded, dict):
        return False
    recorded.pop("eval", None)
    wanted.pop("eval", None)
    return recorded == wanted
