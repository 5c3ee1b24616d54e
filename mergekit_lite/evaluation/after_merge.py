"""`merge run` with an `eval:` section: evaluate the finished merge, then put the tables into its card.

The output's kind and the card sections its writer wrote come from the MergeResult (never read back from the
card), so the rewritten card keeps them: an adapter output's ranks and kept energy, a data-aware method's
calibration section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import EvalError
from . import lm_eval_runner
from .options import EvalOptions, check_eval_section
from .report import CHART_PNG, RESULTS_DIR, EvalReport
from .rows import plan_models
from .tasks import TaskSelection, select_suite_or_tasks

if TYPE_CHECKING:
    from ..api import MergeResult
    from ..config import MergeConfig

#: The folder `merge run` writes the report into, inside the merged checkpoint.
RUN_REPORT_DIR = "eval"


def eval_selection(config: MergeConfig, note: Any = None) -> TaskSelection:
    """The tasks a config's `eval:` section names, resolved and built (call before merging: fail fast)."""
    check_eval_section(config.eval)  # an empty task list would run the whole suite
    tasks = list(config.eval.tasks) if config.eval and config.eval.tasks else None
    return select_suite_or_tasks(tasks, note=note)


def evaluate_after_merge(result: MergeResult, progress: bool = True, selection: TaskSelection | None = None) -> str:
    """Evaluate a finished merge as its config's `eval:` section asks; put the tables in its card; return them.

    The card is rendered again from the config, the output's kind (`result.output_format`) and the sections
    its writer wrote (`result.card_sections`), with the `## Evaluation` section after them.

    The merged folder changes only in two atomic steps, like the merge itself: the report is built in a staging
    folder beside `eval/` and swapped into place when complete (atomic_directory), then the new card, rendered
    before that swap, replaces README.md with os.replace (writers.card.replace_card). A failure or a kill at any
    point leaves the card complete, old or new, and `eval/` absent or complete; a killed run's staging folder is
    removed by the next one.
    """
    from ..writers.atomic import atomic_directory
    from ..writers.card import render_card, replace_card
    from ..writers.staging import remove_stale

    config = result.config
    if result.output_dir is None:
        raise EvalError("nothing to evaluate: the merge was a dry run")
    tasks = selection or (list(config.eval.tasks) if config.eval and config.eval.tasks else None)
    options = EvalOptions.from_spec(config.eval, device=result.device)
    models, references = plan_models([config], [result.output_dir])
    report_dir = (result.output_dir / RUN_REPORT_DIR).resolve()
    remove_stale(report_dir)
    with atomic_directory(report_dir, overwrite=True) as staging:
        report = lm_eval_runner.evaluate_models(models, staging, tasks=tasks, options=options,
                                                references=references, progress=progress)
        merged = next((m.name for m in report.models if m.kind == "merge"), None)
        eval_results = report.scores.get(merged) if merged else None  # the merge's own scores -> model-index
        # the sections the writer put into the card (an adapter's ranks, a calibration), then the tables
        sections = [*result.card_sections, card_section(report)]
        card = render_card(config, extra_sections=sections, eval_results=eval_results,
                           relation="adapter" if result.output_format == "peft" else "merge")
    report.move_to(report_dir)
    replace_card(result.output_dir, card)
    return report.summary()


def card_section(report: EvalReport) -> str:
    """The model card's `## Evaluation` section: the tables, and where the full results are."""
    return (
        "## Evaluation\n\n" + report.markdown("###")
        + f"\nFull lm-eval results: `{RUN_REPORT_DIR}/{RESULTS_DIR}/`; chart: `{RUN_REPORT_DIR}/{CHART_PNG}`.\n"
    )

