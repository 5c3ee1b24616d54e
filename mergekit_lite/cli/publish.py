"""`merge publish OUT_DIR --repo-id user/name`: check a merged folder and upload it to the Hub."""

from __future__ import annotations

import click

from .errors import friendly_errors


@click.command(name="publish")
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--repo-id", required=True, help="The Hub repo to publish to: user/name or org/name.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing). Default: main.")
@click.option("--commit-message", default=None, help="Commit title (default: 'Upload merge made with mergekit_lite').")
@click.option("--dry-run", is_flag=True, help="Check the folder, list files, sizes and the card; send nothing.")
@friendly_errors
def publish_command(out_dir: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
                    dry_run: bool) -> None:
    """Publish OUT_DIR (the output of `merge run`) to the Hub and print the repo URL.

    The folder is checked first (index and shards consistent, config.json and README.md present, no local
    paths in the card's metadata). The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks the Hub.
    Publishing an unchanged folder makes no new commit.
    """
    from ..hub.publish import describe_publish, publish_folder

    if dry_run:
        click.echo(describe_publish(out_dir, repo_id, private=private, revision=revision))
        return
    result = publish_folder(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    click.echo(result.summary())
