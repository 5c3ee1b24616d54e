"""One-line errors for every `merge` subcommand: exit 2 for bad config or input, 1 otherwise.

Signals are turned into exceptions too, so that a stopped run unwinds through the atomic writer and removes
its temporary folder: Ctrl-C (SIGINT) exits 130, SIGTERM 143. SIGXFSZ is ignored, so that hitting the file
size limit is a write error with a message rather than a silent kill.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from ..errors import MergeError


class Terminated(BaseException):
    """SIGTERM arrived; a BaseException like KeyboardInterrupt, so no `except Exception` swallows it."""


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one readable stderr line (exit 2 for bad config/input, 1 otherwise)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            with _signals_as_exceptions():
                return command(*args, **kwargs)
        except MergeError as error:
            if debug:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no partial output was left behind", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated: no partial output was left behind", err=True)
            sys.exit(143)
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            click.echo(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """While a command runs: SIGTERM raises Terminated and SIGXFSZ is ignored; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    wanted = {signal.SIGTERM: _raise_terminated}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
