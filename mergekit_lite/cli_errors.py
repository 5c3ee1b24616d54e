"""One-line errors for every `merge` subcommand: exit 2 for bad config or input, 1 otherwise."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import MergeError


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one readable stderr line (exit 2 for bad config/input, 1 otherwise)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except MergeError as error:
            if debug:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            click.echo(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper
