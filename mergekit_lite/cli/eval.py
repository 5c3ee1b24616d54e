"""`merge eval CONFIG... | MODEL_DIR...`: score merges against their base and adapters with lm-eval, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .errors import friendly_errors

DEFAULT_OUT = "eval_report"


class _LimitType(click.ParamType):
    """--limit: a count of examples per task, or a fraction of each task (0 < x < 1), as lm-eval takes it."""

    name = "N|FRACTION"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | float:
        from ..evaluation.options import parse_limit

        try:
            return parse_limit(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class _GenKwargsType(click.ParamType):
    """--gen-kwargs: key=value pairs separated by commas, as lm-eval takes them (checked: lm-eval is not)."""

    name = "K=V,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from ..evaluation.options import parse_gen_kwargs

        try:
            return parse_gen_kwargs(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class _BatchSizeType(click.ParamType):
    """--batch-size: a positive integer, or lm-eval's auto / auto:N."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        from ..evaluation.options import parse_batch_size

        try:
            return parse_batch_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


@click.command(name="eval")
@click.argument("targets", metavar="CONFIG... | MODEL_DIR...", nargs=-1, required=True)
@click.option("--tasks", "tasks", multiple=True,
              help="Tasks to run, comma-separated or repeated: lm-eval task or group names (arc_easy, hellaswag, "
                   "mmlu, …; the offline suite's capitals, add, reverse, sentiment), or task YAML files / folders "
                   "(a folder runs every task defined in it). Default: the config's eval.tasks, else the suite.")
@click.option("--limit", type=_LimitType(), help="At most N examples per task, or a fraction of each (0.1).")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples (default: each task's own, else 0).")
@click.option("--out", "out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
              help="Folder for the report: report.md, scores.json, chart.png, results/<model>.json and lm-eval's "
                   "own output format in lm_eval/<model>/. New, empty, or an earlier merge eval report (replaced "
                   "whole); never an input's folder.")
@click.option("--batch-size", type=_BatchSizeType(), help="lm-eval batch size, or auto (default: eval.batch_size, else 8).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (merging and scoring).")
@click.option("--seed", type=int, help="One seed for lm-eval's four (python, numpy, torch, few-shot sampling).")
@click.option("--apply-chat-template", is_flag=True, help="Wrap prompts in the tokenizer's chat template.")
@click.option("--gen-kwargs", type=_GenKwargsType(), help="Generation settings for generate_until tasks, e.g. 'temperature=0,max_gen_toks=64'.")
@click.option("--log-samples", is_flag=True, help="Also write every sample's prompt and answer (lm-eval's samples files).")
@click.option("--remerge", is_flag=True, help="Merge again even when a config's output folder exists (replaces it).")
@click.option("--quantize", "quantize", default=None, metavar="FORMAT",
              help="Score every row as its quantized model: Linear weights (not the head) quantized and dequantized "
                   "in memory after loading (q8_0, q4_0, ... from gguf; nf4, fp4, int8 from bitsandbytes); LoRA "
                   "factors of adapter rows stay unquantized.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@friendly_errors
def eval_command(targets: tuple[str, ...], tasks: tuple[str, ...], limit: int | float | None, num_fewshot: int | None,
                 out: str, batch_size: int | str | None, device: str, seed: int | None, apply_chat_template: bool,
                 gen_kwargs: str | None, log_samples: bool, remerge: bool, quantize: str | None,
                 no_progress: bool) -> None:
    """Evaluate merges with lm-eval and write a report.

    A CONFIG (a merge config .yaml) adds the base, each adapter alone (base + adapter through PEFT) and the
    merge it describes, merging it first when its output folder is missing. Several configs over the same base
    share those rows, so one table compares methods. A MODEL_DIR (a checkpoint folder) is scored as it is.
    Models always load offline from local folders; lm-eval's built-in tasks fetch their datasets as lm-eval does
    (HF_DATASETS_OFFLINE and HF_HOME respected), before any model is loaded.
    """
    from ..config import load_config
    from ..errors import EvalError
    from ..evaluation.harness import offline
    from ..evaluation.lm_eval_runner import evaluate_models
    from ..evaluation.options import EvalOptions, check_eval_section
    from ..evaluation.rows import plan_models
    from ..evaluation.tasks import select_tasks, suite_tasks_dir
    from ..writers.ownership import check_output_folder, local_inputs, owned_folder

    configs, model_dirs = [], []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            _check_model_folder(path)
            model_dirs.append(path.resolve())
        elif path.is_file():
            configs.append(load_config(path))
        else:
            raise EvalError(f"{target}: no such config file or model folder")
    for config in configs:
        check_eval_section(config.eval)
    first_eval = next((c.eval for c in configs if c.eval is not None), None)
    options = EvalOptions.from_spec(first_eval, device=device, limit=limit, num_fewshot=num_fewshot,
                                    batch_size=batch_size, seed=seed, apply_chat_template=apply_chat_template or None,
                                    gen_kwargs=gen_kwargs, log_samples=log_samples or None)
    # The report folder: ours or new, apart from every input and every merge output this command may (re)write.
    inputs = [(f"model '{folder.name}'", folder) for folder in model_dirs]
    for config in configs:
        inputs += [*local_inputs(config), ("the config's output", config.output_path)]
    from ..writers.preflight import resolve_output

    report_dir = resolve_output(Path(out), "--out")  # a symlink loop is one line
    check_output_folder(report_dir, "eval", inputs)
    from ..quantize.model import QuantizedRows

    quantized = QuantizedRows(quantize, note=lambda line: click.echo(line, err=True))  # refused before any work
    for config in configs:
        _check_merge_target(config, remerge)
    task_items = list(tasks) or (first_eval.tasks if first_eval and first_eval.tasks else None)
    # Names, files and datasets are checked before anything is merged, loaded or written.
    selection = select_tasks(task_items, suite_tasks_dir(), note=lambda line: click.echo(line, err=True))
    merged_dirs = []
    with offline():  # merging here must not download either
        for config in configs:
            merged_dirs.append(_merged_output(config, device, remerge, progress=not no_progress))
    models, references = plan_models(configs, merged_dirs, model_dirs)
    with owned_folder(report_dir, "eval") as staging, quantized:  # the whole report or none, like a merge output
        report = evaluate_models(models, staging, tasks=selection, options=options, references=references,
                                 progress=not no_progress, quantize=quantized.record)
    report.move_to(report_dir)
    click.echo(report.summary())


def _check_model_folder(folder: Path) -> None:
    """A MODEL_DIR is a checkpoint (config.json naming a model_type, and weights) or a merged PEFT adapter: said
    in one line before anything loads, instead of transformers' error after seconds of work."""
    import json

    from ..errors import EvalError
    from ..evaluation.rows import is_adapter_output

    if is_adapter_output(folder):
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    weights = [p for pattern in ("*.safetensors", "pytorch_model*.bin") for p in folder.glob(pattern)]
    if not isinstance(config, dict) or "model_type" not in config or not weights:
        missing = "a config.json naming its model_type" if not isinstance(config, dict) or "model_type" not in config \
            else "weights (*.safetensors)"
        raise EvalError(f"{folder}: not a model folder (it has no {missing}); give a checkpoint folder such as a "
                        "merge output, or a merge config")


def _merged_output(config: Any, device: str, remerge: bool, progress: bool) -> Path:
    """The config's merged folder: reused when it was made from this very config, else merged now."""
    from ..api import CONFIG_COPY, merge
    from ..errors import EvalError

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


def _check_merge_target(config: Any, remerge: bool) -> None:
    """--remerge replaces a config's output folder only when it is a merge output (or empty): a user's folder
    at that path is refused before anything is merged."""
    from ..writers.ownership import check_replaceable

    if remerge:  # refuses a user's folder, and a merge output holding a user's files
        check_replaceable(config.output_path, "output")


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
