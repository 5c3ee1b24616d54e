"""`merge eval` (placeholder until the eval issue lands)."""

from __future__ import annotations

import click


@click.command(name="eval")
def eval_command() -> None:
    """Evaluate models with lm-eval (not implemented yet)."""
    raise click.ClickException("merge eval is not implemented yet")
