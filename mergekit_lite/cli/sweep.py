"""`merge sweep CONFIG`: try merges on the validation split, report the best on the test split."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import Terminated, friendly_errors

DEFAULT_OUT = "sweep_report"
MAX_POINTS = 10_000  # sweep.run.MAX_POINTS, repeated so that `--help` needs no heavy import


@click.command(name="sweep")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process, one model; ray: Ray actors, each holding the base once.")
@click.option("--address", help="Ray cluster address (ray://host:10001, or 'auto'); default: a local Ray instance.")
@click.option("--workers", type=click.IntRange(min=1), help="Ray actors (default: one per CPU, or per GPU).")
@click.option("--resume", is_flag=True, help="Continue a sweep in --out: reuse every finished point of its cache.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
              help="Folder for leaderboard.md/.json/.csv, best.yaml, test.md/.json, figures/ and the cache: new, "
                   "empty, or an earlier sweep's (replaced whole at the end, its cache kept).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (local backend).")
@click.option("--overwrite", is_flag=True,
              help="Replace the config's output: folder (a merge output) with the best merge; --resume alone does not.")
@click.option("--max-points", type=click.IntRange(min=1), default=MAX_POINTS, show_default=True,
              help="Refuse a sweep of more points than this (a grid's size, or trials) before any work.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@friendly_errors
def sweep_command(config_path: str, backend: str, address: str | None, workers: int | None, resume: bool, out: str,
                  device: str, overwrite: bool, max_points: int, no_progress: bool) -> None:
    """Score every point of CONFIG's sweep: section on validation; the best, on test."""
    from ..evaluation.harness import offline
    from ..sweep import load_sweep_config, run_sweep

    config = load_sweep_config(config_path)
    try:
        with offline():
            result = run_sweep(config, out, backend=backend, address=address, workers=workers, resume=resume,
                               progress=not no_progress, device=device, overwrite=overwrite,
                               note=lambda line: click.echo(line, err=True), max_points=max_points)
    except (KeyboardInterrupt, Terminated) as stopped:
        what = "interrupted" if isinstance(stopped, KeyboardInterrupt) else "terminated"
        kept = Path(out) / "cache"
        left = (f"finished points are kept in {kept}; run again with --resume to continue" if kept.is_dir()
                else "no point had finished, nothing was kept")
        click.echo(f"{what}: {left}; the report files were not written", err=True)
        sys.exit(130 if what == "interrupted" else 143)
    best = result.best
    assert best is not None
    click.echo(f"best of {len(result.rows)} point(s) by {result.metric} on validation: {best.name} "
               f"({best.summary.get(result.metric):.3f}); evaluated {result.evaluated}, reused {result.reused}")
    click.echo(f"test split: {out}/test.md; leaderboard: {out}/leaderboard.md; config: {out}/best.yaml")
