"""lm-eval's own options, as `merge eval`, a config's `eval:` section and `merge sweep` pass them through.

One dataclass, so the three entry points cannot drift apart: what a user knows from `lm-eval run`
(`--num-fewshot`, `--limit` as a count or a fraction, `--batch-size auto`, `--seed`, `--apply-chat-template`,
`--gen-kwargs`, `--log-samples`) means the same here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_AUTO_BATCH = re.compile(r"^auto(:\d+)?$")
#: one `key=value` of --gen-kwargs: lm-eval splits on ',' then '=', and takes anything, even '===' or 'x'
_GEN_KWARG = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*=\s*[^=\s][^=]*$")


def parse_limit(value: Any) -> int | float:
    """A count of examples per task (an integer ≥ 1) or a fraction of each task (0 < limit < 1)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"limit must be a count (≥ 1) or a fraction (0 < limit < 1), not {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"limit must be a finite count (≥ 1) or a fraction (0 < limit < 1), not {value!r}")
    if 0 < number < 1:
        return number
    if number >= 1 and number == int(number):
        return int(number)
    raise ValueError(f"limit must be a count (≥ 1) or a fraction (0 < limit < 1), not {value!r}")


def parse_batch_size(value: Any) -> int | str:
    """A batch size (an integer ≥ 1) or lm-eval's 'auto' / 'auto:N' (find the largest that fits, N times)."""
    if isinstance(value, str) and _AUTO_BATCH.match(value.strip()):
        return value.strip()
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"batch_size must be a positive integer, 'auto' or 'auto:N', not {value!r}") from None
    if number < 1:
        raise ValueError(f"batch_size must be a positive integer, 'auto' or 'auto:N', not {value!r}")
    return number


def parse_gen_kwargs(value: Any) -> str:
    """lm-eval's generation settings, `key=value` pairs separated by commas ('temperature=0,max_gen_toks=64');
    anything else is refused here, where lm-eval would pass `===` on as an empty key."""
    if not isinstance(value, str):
        raise ValueError(f"gen_kwargs must be text like 'temperature=0,max_gen_toks=64', not {value!r}")
    items = value.split(",")
    bad = next((item for item in items if not _GEN_KWARG.match(item)), None)
    if not value.strip() or bad is not None:
        raise ValueError(f"gen_kwargs must be key=value pairs separated by commas, like 'temperature=0,"
                         f"max_gen_toks=64'; {bad if bad is not None else value!r} is not one")
    return value.strip()


def check_eval_section(spec: Any) -> None:
    """What a config's `eval:` section may not say although its types allow it: an empty task list (it would run
    the whole suite), generation settings lm-eval would misread. MergeConfigError naming the key."""
    from ..errors import MergeConfigError

    if spec is None:
        return
    if spec.tasks is not None and not list(spec.tasks):
        raise MergeConfigError("eval.tasks: an empty list; name at least one task, or drop the key to run the "
                               "offline suite")
    if spec.gen_kwargs is not None:
        try:
            parse_gen_kwargs(spec.gen_kwargs)
        except ValueError as error:
            raise MergeConfigError(f"eval.{error}") from None


@dataclass(frozen=True)
class EvalOptions:
    """How lm-eval runs every model of one evaluation (the same for all rows, so the table compares)."""

    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 8
    device: str = "cpu"
    seed: int | None = None
    apply_chat_template: bool = False
    gen_kwargs: str | None = None
    log_samples: bool = False

    def simple_evaluate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `lm_eval.simple_evaluate` (one `seed` sets all four of lm-eval's seeds)."""
        kwargs: dict[str, Any] = {
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size,
            "apply_chat_template": self.apply_chat_template,
            "gen_kwargs": self.gen_kwargs or None,
            "log_samples": self.log_samples,
        }
        if self.seed is not None:
            kwargs.update(random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed,
                          fewshot_random_seed=self.seed)
        return kwargs

    def describe(self) -> str:
        """The settings in one phrase, for the report's first line."""
        if self.limit is None:
            limit = "every example of each task"
        elif isinstance(self.limit, float):
            limit = f"the first {self.limit:.0%} of each task"
        else:
            limit = f"first {self.limit} examples of each task"
        shots = "each task's own few-shot setting (0 unless its YAML sets one)" if self.num_fewshot is None \
            else f"{self.num_fewshot}-shot"
        extras = [f"seed {self.seed}" if self.seed is not None else "",
                  "chat template" if self.apply_chat_template else "",
                  f"gen_kwargs {self.gen_kwargs}" if self.gen_kwargs else ""]
        return ", ".join([shots, limit, *(e for e in extras if e)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy for scores.json."""
        return {"limit": self.limit, "num_fewshot": self.num_fewshot, "batch_size": self.batch_size,
                "device": self.device, "seed": self.seed, "apply_chat_template": self.apply_chat_template,
                "gen_kwargs": self.gen_kwargs, "log_samples": self.log_samples}

    @classmethod
    def from_spec(cls, spec: Any, device: str = "cpu", **overrides: Any) -> EvalOptions:
        """From a config's `eval:` section (or None), with CLI values (those not None) winning."""
        values: dict[str, Any] = {"device": device}
        check_eval_section(spec)
        if spec is not None:
            values.update(limit=spec.limit, num_fewshot=spec.num_fewshot, batch_size=spec.batch_size,
                          seed=spec.seed, apply_chat_template=spec.apply_chat_template, gen_kwargs=spec.gen_kwargs,
                          log_samples=spec.log_samples)
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)
