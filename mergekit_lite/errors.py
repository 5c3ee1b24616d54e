"""Every error mergekit_lite raises on purpose, so the CLI can turn each into one readable line and exit code.

Exit 2 when what was asked cannot be done as given (config, inputs, output path, a missing extra, a folder
that cannot be published); exit 1 when a run, a check or the Hub failed. Modules that used to define some of
these (formats.integrity, evaluation.logit_check, evaluation.harness, hub.publish) import them from here,
so the old import paths keep working.
"""

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


class NotACheckpointError(InputError):
    """The folder holds no safetensors checkpoint at all (nothing to verify or publish)."""


class VerifyExtraMissing(MergeError):
    """transformers or peft is not installed, so the logit check cannot run."""

    exit_code = 2


class EvalError(MergeError):
    """An evaluation cannot run as asked: lm-eval missing, an unknown task, a model folder that is not there."""

    exit_code = 2


class PublishError(MergeError):
    """Publishing failed on the Hub's side: no or wrong token, no write access, network, offline mode."""

    exit_code = 1


class UnpublishableError(PublishError):
    """The folder, its card or the repo id cannot be published as they are (nothing was sent)."""

    exit_code = 2
