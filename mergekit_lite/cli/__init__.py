"""The `merge` command line: click commands only; the work happens in the API they call."""

from .commands import main

__all__ = ["main"]
