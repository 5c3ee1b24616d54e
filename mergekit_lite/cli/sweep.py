"""`merge sweep CONFIG`: try merges on the validation split, report the best on the test split."""

from __future__ import annotations

import sys

import click

from .errors import friendly_errors

DEFAULT_OUT = "sweep_report"


@click.command(name="sweep")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process, one model; ray: Ray actors, each holding the base once.")
@click.option("--address", help="Ray cluster address (ray://host:10001, or 'auto'); default: a local Ray instance.")
@click.option("--workers", type=click.IntRange(min=1), help="Ray actors (default: one per CPU, or per GPU).")
@click.option("--resume", is_flag=True, help="Continue a sweep in --out: reuse every finished point of its cache.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
              help="Folder for leaderboard.md/.json/.csv, best.yaml, test.md/.json, figures/ and the cache.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (local backend).")
@click.option("--overwrite", is_flag=True, help="Replace the config's output: folder with the best merge.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@friendly_errors
def sweep_command(config_path: str, backend: str, address: str | None, workers: int | None, resume: bool, out: str,
                  device: str, overwrite: bool, no_progress: bool) -> None:
    """Score every point of CONFIG's sweep: section on validation; the best, on test."""
    from ..evaluation.lm_eval_runner import offline
    from ..sweep import load_sweep_config, run_sweep

    config = load_sweep_config(config_path)
    try:
        with offline():
            result = run_sweep(config, out, backend=backend, address=address, workers=workers, resume=resume,
                               progress=not no_progress, device=device, overwrite=overwrite,
                               note=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished points are kept in {out}/cache; run again with --resume to continue",
                   err=True)
        sys.exit(130)
    best = result.best
    assert best is not None
    click.echo(f"best of {len(result.rows)} point(s) by {result.metric} on validation: {best.name} "
               f"({best.summary.get(result.metric):.3f}); evaluated {result.evaluated}, reused {result.reused}")
    click.echo(f"test split: {out}/test.md; leaderboard: {out}/leaderboard.md; config: {out}/best.yaml")
