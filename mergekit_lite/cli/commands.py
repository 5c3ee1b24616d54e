"""The `merge` command line: thin wrappers over the Python API; errors become one line and an exit code."""

from __future__ import annotations

import logging

import click

from ..version import tool_version
from .errors import OneLineErrors, friendly_errors
from .startup import heavy_imports


@click.group(cls=OneLineErrors)
@click.version_option(tool_version(), prog_name="mergekit_lite")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does.")
def main(debug: bool, verbose: bool) -> None:
    """Merge PEFT LoRA adapters into one standard Hugging Face checkpoint."""
    logging.basicConfig(level=logging.INFO if verbose or debug else logging.WARNING, format="%(message)s")


def _a_folder(value: str | None) -> str | None:
    """An empty --out would be the current folder: refuse it (a click error, so one line and exit 2)."""
    if value is not None and not value.strip():
        raise click.BadParameter("must name a folder, got an empty string")
    return value


def _a_size(value: str) -> str:
    """--max-memory as given, once it reads as a size (a click error, so one line and exit 2, if it does not)."""
    from ..units import parse_size

    try:
        parse_size(value)
    except (ValueError, OverflowError) as error:
        raise click.BadParameter(str(error)) from None
    return value


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(), callback=lambda ctx, param, value: _a_folder(value),
              help="Output folder (overrides output.path).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--chunk-rows", type=click.IntRange(min=1), help="Force the row-chunk size (default: from --max-memory).")
@click.option("--max-memory", default="512MiB", show_default=True, callback=lambda ctx, param, value: _a_size(value),
              help="Memory budget for one chunk's working set, in bytes or like '512MiB', '2GB'.")
@click.option("--workers", type=click.IntRange(min=1),
              help="CPU threads merging chunks side by side (default: one per core, up to 8).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output folder an earlier merge wrote (or an empty one); any other is refused.")
@click.option("--dry-run", is_flag=True, help="Print the plan and a memory estimate; write nothing.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--allow-pickle", is_flag=True,
              help="Read pickled .bin inputs you trust (loaded with torch.load(weights_only=True)); refused otherwise.")
@friendly_errors
def run(config_path: str, out: str | None, device: str, chunk_rows: int | None, max_memory: str,
        workers: int | None, overwrite: bool, dry_run: bool, no_progress: bool, allow_pickle: bool) -> None:
    """Merge the adapters CONFIG lists into its base and write the checkpoint."""
    with heavy_imports():
        from ..api import describe_plan, merge
        from ..config import load_config
        from ..compat.mega import run_if_mega

    if run_if_mega(config_path, out, dry_run, click.echo, device=device, chunk_rows=chunk_rows,  # mergekit-mega
                   max_memory=max_memory, workers=workers, overwrite=overwrite, progress=not no_progress,
                   allow_pickle=allow_pickle):
        return
    config = load_config(config_path)
    if out:
        config = config.with_output_path(out)
    if dry_run:
        click.echo(describe_plan(config, device=device, chunk_rows=chunk_rows, max_memory=max_memory,
                                 allow_pickle=allow_pickle, workers=workers))
        return
    if config.output.push_to_hub:  # a missing token or offline mode fails now, not after a long merge
        from ..hub.publish import preflight

        preflight(config.output.push_to_hub)
    selection = None
    if config.eval is not None:  # unknown task names or an unreachable dataset fail now, not after the merge
        from ..evaluation.after_merge import eval_selection

        selection = eval_selection(config, note=lambda line: click.echo(line, err=True))
    result = merge(config, device=device, chunk_rows=chunk_rows, max_memory=max_memory, workers=workers,
                   overwrite=overwrite, progress=not no_progress, allow_pickle=allow_pickle)
    click.echo(result.summary())
    if config.eval is not None:
        from ..evaluation.after_merge import evaluate_after_merge

        click.echo(evaluate_after_merge(result, progress=not no_progress, selection=selection))
    if config.output.push_to_hub:
        from ..hub.publish import publish_after_merge

        click.echo(publish_after_merge(result))


@main.command()
@friendly_errors
def methods() -> None:
    """List the merge methods with their parameters and papers."""
    from ..methods import REGISTRY

    for method in REGISTRY.values():
        params = ", ".join(
            f"{p.name}={p.default!r}{' (per adapter)' if p.per_adapter else ''}" for p in method.params
        )
        click.echo(f"{method.name:18s} {method.display_name}: {method.summary}")
        click.echo(f"{'':18s} parameters: {params or 'none'}; paper: {method.paper_url or '-'}")


def _add_optional_commands() -> None:
    """Commands that live in their own modules (each owns its imports, which can be heavy)."""
    from .convert import convert_command
    from .eval import eval_command
    from .inspect import inspect_command
    from .publish import publish_command
    from .sweep import sweep_command
    from .verify import verify_command

    main.add_command(convert_command, "convert")
    main.add_command(eval_command, "eval")
    main.add_command(inspect_command, "inspect")
    main.add_command(publish_command, "publish")
    main.add_command(sweep_command, "sweep")
    main.add_command(verify_command, "verify")


_add_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
