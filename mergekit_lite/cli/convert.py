"""`merge convert`: a mergekit YAML config printed as the equivalent mergekit_lite config."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from .errors import friendly_errors


@click.command()
@click.argument("config_path", metavar="MERGEKIT_CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, help="output.path of the printed config (of the last document of a "
              "mergekit-mega file)  [default: merged]")
@friendly_errors
def convert_command(config_path: str, out: str | None) -> None:
    """Print the mergekit_lite config that runs MERGEKIT_CONFIG (a mergekit YAML) with mergekit's result.

    Each difference no mergekit_lite parameter can express goes to stderr, one line each (and into the printed
    YAML as a comment); features mergekit_lite lacks (layer stacking, passthrough, modules, tokenizer merging,
    other methods) are refused naming the key. A mergekit-mega file (several documents) prints one config per
    document, each earlier output named by its folder.
    """
    from ..compat.mega import converted, read_documents
    from ..compat.mergekit import convert, is_mergekit_config
    from ..config import MergeConfig, read_config_data
    from ..errors import MergeConfigError

    documents = read_documents(config_path)
    if documents is not None:
        path = Path(config_path)
        blocks = []
        for document, data, differences in converted(path, documents, out):
            comments = [f"# document {document.number} of {path.name}"
                        + (f" ('{document.name}')" if document.name else "") + ", converted by `merge convert`"]
            comments += [f"# mergekit difference: {line}" for line in differences]
            blocks.append("\n".join(comments) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
            for line in differences:
                click.echo(f"mergekit difference ({document.label}): {line}", err=True)
        click.echo("---\n".join(blocks).rstrip())
        return
    data, path = read_config_data(config_path)
    if not is_mergekit_config(data):
        raise MergeConfigError(f"{path}: not a mergekit config (no 'merge_method'); it may already be ours")
    try:
        conversion = convert(data, output=out or "merged", base_dir=path.resolve().parent)
        MergeConfig.from_dict(conversion.config, path.resolve().parent)  # what we print must load as it is
    except MergeConfigError as error:
        raise MergeConfigError(f"{path}: {error}") from None
    comments = [f"# converted from mergekit config {path.name} by `merge convert`"]
    comments += [f"# mergekit difference: {line}" for line in conversion.differences]
    click.echo("\n".join(comments))
    click.echo(yaml.safe_dump(conversion.config, sort_keys=False, allow_unicode=True).rstrip())
    for line in conversion.differences:
        click.echo(f"mergekit difference: {line}", err=True)
