"""`merge convert`: a mergekit YAML config printed as the equivalent mergekit_lite config."""

from __future__ import annotations

import click
import yaml

from .errors import friendly_errors


@click.command()
@click.argument("config_path", metavar="MERGEKIT_CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "out", default="merged", show_default=True, help="output.path of the printed config.")
@friendly_errors
def convert_command(config_path: str, out: str) -> None:
    """Print the mergekit_lite config that runs MERGEKIT_CONFIG (a mergekit YAML) with mergekit's result.

    Each difference no mergekit_lite parameter can express goes to stderr, one line each (and into the printed
    YAML as a comment); features mergekit_lite lacks (slices, passthrough, modules, tokenizer merging, other
    methods) are refused naming the key.
    """
    from ..compat.mergekit import convert, is_mergekit_config
    from ..config import MergeConfig, read_config_data
    from ..errors import MergeConfigError

    data, path = read_config_data(config_path)
    if not is_mergekit_config(data):
        raise MergeConfigError(f"{path}: not a mergekit config (no 'merge_method'); it may already be ours")
    try:
        conversion = convert(data, output=out, base_dir=path.resolve().parent)
        MergeConfig.from_dict(conversion.config, path.resolve().parent)  # what we print must load as it is
    except MergeConfigError as error:
        raise MergeConfigError(f"{path}: {error}") from None
    comments = [f"# converted from mergekit config {path.name} by `merge convert`"]
    comments += [f"# mergekit difference: {line}" for line in conversion.differences]
    click.echo("\n".join(comments))
    click.echo(yaml.safe_dump(conversion.config, sort_keys=False, allow_unicode=True).rstrip())
    for line in conversion.differences:
        click.echo(f"mergekit difference: {line}", err=True)
