"""The installed version, read from package metadata (never hard-coded)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def tool_version() -> str:
    """mergekit_lite's installed version, or 'unknown' when run from a bare source tree."""
    try:
        return version("mergekit_lite")
    except PackageNotFoundError:
        return "unknown"
