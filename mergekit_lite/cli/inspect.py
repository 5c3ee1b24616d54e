"""`merge inspect CONFIG`: compare the adapters of a merge config before merging (see docs/INSPECT.md)."""

from __future__ import annotations

import json

import click

from .errors import friendly_errors
from .startup import heavy_imports


@click.command(name="inspect")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), default="inspect_report", show_default=True,
              help="Folder for report.md, inspect.json and the figures (new or empty; an earlier report of merge inspect "
                   "there is replaced whole, any other folder refused).")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="What to print: the short report, or inspect.json.")
@click.option("--no-plots", is_flag=True, help="Write no PNG figures (no matplotlib needed).")
@click.option("--density", type=float,
              help="TIES density for the sign-conflict rate (default: the config method's density, else 0.5).")
@click.option("--sample", type=click.IntRange(min=1),
              help="Count conflicts on at most N entries per tensor (an estimate, and the report says so); "
                   "default: every entry.")
@click.option("--max-memory", default="512MiB", show_default=True,
              help="Memory budget for one chunk's working set, in bytes or like '512MiB', '2GB'.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--calibration-size", type=click.IntRange(min=1),
              help="With `calibration:` on the adapters: prompts per adapter for the interference matrix "
                   "(default: each entry's calibration_size, else 64).")
@click.option("--allow-pickle", is_flag=True,
              help="Read pickled .bin inputs you trust (loaded with torch.load(weights_only=True)); refused otherwise.")
@click.option("--quantize", "quantize", default=None, metavar="FORMATS",
              help="Also flag adapters whose per-tensor change sits below these formats' rounding steps (q8_0, "
                   "q4_0, nf4, int8, ...; printed after the text report).")
@friendly_errors
def inspect_command(config_path: str, out: str, output_format: str, no_plots: bool, density: float | None,
                    sample: int | None, max_memory: str, device: str, no_progress: bool, calibration_size: int | None,
                    allow_pickle: bool, quantize: str | None) -> None:
    """Compare the adapters CONFIG lists, before merging: norms, cosines, subspace overlaps, sign conflicts.

    A method in CONFIG is not needed (its density, when it has one, is the default for the conflict rate).
    Prints a short report with a heuristic verdict and writes report.md, inspect.json and figures to --out.
    With `calibration:` prompts on the adapters it also measures what adding each adapter costs the others (an
    interference matrix from their own greedy continuations) and writes suggested starting weights
    (suggested_merge.yaml).
    """
    with heavy_imports():
        from ..inspection.inputs import load_inspect_config
        from ..inspection.run import inspect

    loaded = load_inspect_config(config_path)
    if quantize is not None:  # an unknown or unavailable format is refused before any work
        from ..quantize.formats import resolve

        resolve(quantize)
    result = inspect(loaded.config, loaded.method_given, out, density=density, sample=sample, max_memory=max_memory,
                     device=device, plots=not no_plots, progress=not no_progress and output_format == "text",
                     allow_pickle=allow_pickle, calibration=loaded.calibration, calibration_size=calibration_size)
    if output_format == "json":
        click.echo(json.dumps(result.data, indent=1, ensure_ascii=False))
        return
    click.echo(result.text)
    click.echo(f"report: {result.out_dir / 'report.md'} (inspect.json"
               + (", " + ", ".join(result.data["figures"]) if result.data["figures"] else "") + ")")
    if quantize is not None:
        from ..quantize.steps import step_lines

        click.echo("\n".join(step_lines(result.inspection, quantize)))
