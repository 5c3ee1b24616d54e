"""`merge publish` (placeholder until the Hub issue lands)."""

from __future__ import annotations

import click


@click.command(name="publish")
def publish_command() -> None:
    """Publish a merged folder to the Hub (not implemented yet)."""
    raise click.ClickException("merge publish is not implemented yet")
