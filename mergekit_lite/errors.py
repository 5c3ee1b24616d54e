"""Errors of our own, so the CLI can turn each into one readable line and the right exit code."""

from __future__ import annotations


class MergeError(Exception):
    """Base of every error mergekit_lite raises on purpose."""

    exit_code = 1


class MergeConfigError(MergeError):
    """The config file is invalid: an unknown key, a bad value, a parameter a method does not take."""

    exit_code = 2


class InputError(MergeError):
    """A base checkpoint or an adapter on disk cannot be used as given."""

    exit_code = 2


class CheckpointError(InputError):
    """The base checkpoint is missing, malformed or in a format we refuse (pickled .bin)."""


class AdapterError(InputError):
    """A PEFT adapter is missing, malformed, or uses a feature we refuse to merge silently."""


class NonFiniteError(MergeError):
    """A merged tensor holds inf or NaN after the cast to the output dtype."""


class OutputExistsError(MergeError):
    """The output folder exists and --overwrite was not given."""

    exit_code = 2


class OutputPathError(MergeError):
    """The output path cannot be used: it is a file, or it lies inside one of the inputs."""

    exit_code = 2


class WriteError(MergeError):
    """Writing the output failed (disk full, file size limit, permissions); nothing was left at the target."""


class IntegrityError(MergeError):
    """A written checkpoint does not match what the plan said it would hold, or `merge verify` found a fault."""
