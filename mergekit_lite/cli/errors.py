"""One-line errors for every `merge` subcommand: exit 2 for bad config or input, 1 otherwise.

Click's own errors (a bad option value, a missing argument, an unknown option or command) are one line and exit 2
too, through the `OneLineErrors` group, instead of click's usage block: the user learns what to fix and where
`--help` is, and scripts read one line like every other error.

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


class OneLineUsageError(click.UsageError):
    """A click error (bad option value, missing argument, unknown option, ...) shown as one `error:` line, exit 2."""

    exit_code = 2

    def __init__(self, error: click.ClickException) -> None:
        ctx = getattr(error, "ctx", None)
        where = ctx.command_path if ctx is not None else "merge"
        message = " ".join(error.format_message().split()).rstrip(".")  # click's messages may span lines
        super().__init__(f"{where}: {message}; see '{where} --help'", ctx=ctx)

    def show(self, file: Any = None) -> None:
        """One line on stderr, no usage block."""
        click.echo(f"error: {self.message}", file=file, err=file is None)


@contextmanager
def _click_errors_in_one_line() -> Iterator[None]:
    """Turn any click error raised inside into a OneLineUsageError (the help shown for a bare group stays)."""
    try:
        yield
    except (OneLineUsageError, click.exceptions.NoArgsIsHelpError):
        raise
    except click.ClickException as error:
        raise OneLineUsageError(error) from None


class OneLineErrors(click.Group):
    """A click group whose parsing errors, and its subcommands', are one `error:` line and exit 2.

    Parsing happens in the group's own `make_context` (options before the command) and in `invoke` (the command's
    name, then the command's options and arguments): wrapping both catches every click error once, for every
    command, whatever module defines it. `--help` and `--version` are not errors and print as before.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _click_errors_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _click_errors_in_one_line():
            return super().invoke(ctx)


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
            click.echo(f"error: {_one_line(str(error))}", err=True)
            sys.exit(error.exit_code)
        except (click.ClickException, click.exceptions.Exit):
            raise  # click's own: a usage error becomes one line in OneLineErrors
        except KeyboardInterrupt:
            click.echo("interrupted: no partial output was left behind", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated: no partial output was left behind", err=True)
            sys.exit(143)
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if debug:
                raise
            click.echo(f"error: {type(error).__name__}: {_one_line(str(error))} (run with --debug for the traceback)",
                       err=True)
            sys.exit(1)

    return wrapper


def _one_line(message: str) -> str:
    """A message kept on one line: a newline or carriage return inside it (a folder named with one) is escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


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
