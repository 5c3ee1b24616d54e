"""`merge sweep`: find the best merge for the user's own tasks (base loaded once, merges patched in memory,
validation picks, test reports), on one machine or on Ray actors."""

from .result import SweepResult
from .run import SweepError, run_sweep
from .spec import SweepConfig, load_sweep_config, sweep_config_from_dict

__all__ = ["SweepConfig", "SweepError", "SweepResult", "load_sweep_config", "run_sweep", "sweep_config_from_dict"]
