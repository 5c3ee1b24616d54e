"""The model card (README.md): Hub metadata plus exactly how the merge was made (SEMANTICS §6).

Metadata never holds a local path (the Hub rejects them): `base_model` is written only when the base is a
Hub id, and the body names Hub ids, never the cache folders they were downloaded to.

A merge writes its card in the staging folder, so it arrives with the checkpoint in one swap; a card rewritten
later, in place (`merge run` with an `eval:` section), goes through `replace_card`: all or nothing too.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import MergeConfig
from ..hub.resolve import cached_model_dir, hub_reference, parse_hub_id
from ..version import tool_version

if TYPE_CHECKING:  # huggingface_hub is imported only when a card is written (it costs ~0.4 s of start-up)
    from huggingface_hub import EvalResult

logger = logging.getLogger(__name__)

TAGS = ["merge", "mergekit_lite"]
#: The card's file name in a checkpoint folder (what the Hub shows).
CARD_FILE = "README.md"
DEFAULT_PIPELINE_TAG = "text-generation"
#: config.json architecture suffix -> pipeline tag, when the base card does not say
_ARCHITECTURE_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)
_LICENSE_KEYS = ("license", "license_name", "license_link")


def hub_id_or_none(reference: str, local_path: Path) -> str | None:
    """The repo id when `reference` names a Hub repo, None when it is a local folder (the Hub rejects paths)."""
    if local_path.exists():
        return None
    ref = parse_hub_id(reference)
    return ref.repo_id if ref else None


def render_card(
    config: MergeConfig,
    extra_sections: list[str] | None = None,
    eval_results: Mapping[str, Mapping[str, float]] | None = None,
    relation: str = "merge",
) -> str:
    """The model card text: YAML front matter and a body that lets anyone reproduce the merge.

    `relation` is the output's relation to the base: "merge" (a checkpoint, `library_name: transformers`) or
    "adapter" (a merged PEFT adapter, `library_name: peft`, tagged `lora`).

    `extra_sections` are markdown blocks placed before "Reproduce"; `eval_results` (task -> metric -> value,
    of the merged model) become an "Evaluation" table and `model-index` results in the metadata.
    """
    method = config.merge_method
    base_ref = hub_reference(config, config.base_model)
    base_meta = _base_metadata(config)
    name = _model_name(config)
    adapter = relation == "adapter"
    data: dict[str, Any] = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": _pipeline_tag(base_meta),
        "tags": [*TAGS, "lora"] if adapter else list(TAGS),
        "base_model_relation": relation,
    }
    if base_ref is not None:
        data["base_model"] = base_ref.repo_id
    data.update(_inherited_license(base_meta, base_ref.repo_id if base_ref else None))
    if eval_results:
        data["model_name"] = name
        data["eval_results"] = _eval_results(eval_results)
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(**data)

    params = ", ".join(f"`{k}={_one_line(v)}`" for k, v in config.global_params.items()) or "none"
    paper = f" ([paper]({method.paper_url}))" if method.paper_url else ""
    base_shown = f"[{base_ref}]({base_ref.url})" if base_ref else f"`{config.base_model}` (local)"
    body = "\n".join(
        [
            f"# {name}",
            "",
            f"A merge of {_inputs_phrase(config)} "
            f"{'as one LoRA adapter for' if adapter else 'into'} {base_shown}, made with "
            f"mergekit_lite {tool_version()}.",
            "",
            "## Method",
            "",
            f"**{method.display_name}** (`{method.name}`){paper}: {method.summary}.",
            "",
            f"Parameters: {params}. Seed: `{config.seed}`. Arithmetic in float32, rounded once to the output dtype "
            f"(`{config.output.dtype or ('float32' if adapter else 'same as base')}`"
            f"{', the dtype of the factors' if adapter else ''}).",
            "",
            "## Adapters",
            "",
            *_adapter_table(config),
            "",
            *(_eval_table(eval_results) if eval_results else []),
            *[section.rstrip() + "\n" for section in extra_sections or []],
            "## Reproduce",
            "",
            f"With mergekit_lite {tool_version()}: `merge run config.yaml`, where `config.yaml` is:",
            "",
            "```yaml",
            config.to_yaml().rstrip(),
            "```",
            "",
        ]
    )
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def write_calibrated(staging: Path, calibrated: Any, config: MergeConfig, kind: Any) -> None:
    """A data-aware merge's side files (coefficients.json, pictures) into the staging folder, and its card again
    with the calibration's section (and the output kind's own section, for an adapter output)."""
    for name, data in calibrated.side_files.items():
        path = staging / name
        try:
            path.write_bytes(data)
        except OSError as error:
            from ..errors import WriteError

            raise WriteError(f"cannot write {path}: {error.strerror or error}") from None
    if not calibrated.card_section:
        return
    text = render_card(config, extra_sections=written_sections(kind, calibrated), relation=kind.card_relation)
    (staging / CARD_FILE).write_text(text)


def written_sections(kind: Any, calibrated: Any = None) -> list[str]:
    """The sections a merge's card carries besides the method's: the output kind's own (an adapter's ranks),
    then a data-aware method's calibration; `MergeResult.card_sections` keeps them for a later card."""
    own = [calibrated.card_section] if calibrated is not None and calibrated.card_section else []
    return [*kind.card_sections(), *own]


def replace_card(folder: Path, text: str) -> Path:
    """Make `text` the card of the checkpoint in `folder`, atomically; return the card's path.

    A reader, or a run killed at any moment, finds the old card or the new one, never a part of either: the
    text goes to a temporary file in the same folder (same file system), is flushed to disk, and os.replace
    renames it over README.md. On any failure the temporary file is removed and the old card is untouched.
    The new card keeps the old one's permission bits (a first card gets the umask's).
    """
    path = Path(folder) / CARD_FILE
    fd, temporary = tempfile.mkstemp(prefix=f".{CARD_FILE}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(path))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)
    return path


def _file_mode(path: Path) -> int:
    """Permission bits for a file replacing `path`: its own, else what open() gives a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk where the system lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def warm_card_imports() -> threading.Thread:
    """Import the Hub client's card modules in a background thread while the merge runs.

    They cost ~0.4 s of Python imports; the engine spends its time in torch and I/O with the GIL released,
    so the import overlaps it instead of adding to the wall time when the card is rendered at the end.
    """
    thread = threading.Thread(target=importlib.import_module, args=("huggingface_hub.repocard",),
                              name="warm card imports", daemon=True)
    thread.start()
    return thread


def _model_name(config: MergeConfig) -> str:
    """The card's title: the repo name it will be pushed to, else the output folder's name."""
    if config.output.push_to_hub:
        return config.output.push_to_hub.rstrip("/").split("/")[-1]
    return Path(config.output.path).name


def _adapter_table(config: MergeConfig) -> list[str]:
    """One row per adapter: where it comes from (a Hub link when it has one), weight, density, own params."""
    has_density = any(p.name == "density" for p in config.merge_method.params)
    other_keys = sorted({k for own in config.adapter_params for k in own if k != "density"})
    lines = [
        "| # | adapter | weight | density |" + "".join(f" {k} |" for k in other_keys),
        "|---|---|---|---|" + "---|" * len(other_keys),
    ]
    for index, (spec, own) in enumerate(zip(config.inputs, config.adapter_params)):
        ref = hub_reference(config, spec.path)
        shown = f"[{ref}]({ref.url})" if ref else f"`{spec.path}`"
        if spec.name:
            shown = f"{spec.name}: {shown}"
        if config.is_full_model(index):
            shown = f"full model {shown}"
        density = own.get("density") if has_density else 1
        own_cells = "".join(f" {_one_line(own.get(k))} |" for k in other_keys)
        lines.append(f"| {index} | {shown} | {_number(spec.weight)} | {_number(density)} |{own_cells}")
    lines += [
        "",
        f"Weight is {config.merge_method.weight_meaning}; density is the fraction of its entries the method keeps "
        + ("(the rest are trimmed or dropped)." if has_density else "(1: this method keeps every entry)."),
    ]
    return lines


def _one_line(value: Any) -> str:
    """A parameter value as one line of a table cell (a template's newlines as \\n, pipes escaped)."""
    return str(value).replace("\n", "\\n").replace("|", "\\|")


def _inputs_phrase(config: MergeConfig) -> str:
    """'3 LoRA adapter(s)', '2 full fine-tuned model(s)', or both."""
    parts = [f"{len(config.adapters)} LoRA adapter(s)"] if config.adapters else []
    parts += [f"{len(config.models)} full fine-tuned model(s)"] if config.models else []
    return " and ".join(parts)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _eval_results(results: Mapping[str, Mapping[str, float]]) -> list[EvalResult]:
    """task -> metric -> value as Hub `model-index` results (lm-eval task names as the dataset)."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="text-generation",
            task_name=task,
            dataset_type=task,
            dataset_name=task,
            metric_type=metric,
            metric_name=metric,
            metric_value=float(value),
        )
        for task, metrics in results.items()
        for metric, value in metrics.items()
    ]


def _eval_table(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The merged model's scores as a markdown table (the model-index metadata's rows), headed apart from the
    `## Evaluation` section that `merge run`'s eval: step adds, so a card has one heading of each."""
    rows = [f"| {task} | {metric} | {float(value):.4g} |" for task, metrics in results.items() for metric, value in
            metrics.items()]
    return ["## Scores", "", "| task | metric | value |", "|---|---|---|", *rows, ""]


def _base_metadata(config: MergeConfig) -> dict[str, Any]:
    """The base's card metadata and config.json architectures, read from disk only (local or cached)."""
    folder = cached_model_dir(config, config.base_model, kind="base")
    found: dict[str, Any] = {}
    if folder is None:
        return found
    readme = folder / "README.md"
    if readme.is_file():
        try:
            from huggingface_hub.repocard import metadata_load

            found.update(metadata_load(readme) or {})
        except (ValueError, OSError, UnicodeDecodeError) as error:  # a broken base card costs only the license
            logger.warning("cannot read the base's card metadata %s: %s", readme, error)
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            found["_architectures"] = json.loads(config_file.read_text()).get("architectures") or []
        except (ValueError, OSError):
            pass
    return found


def _pipeline_tag(base_meta: Mapping[str, Any]) -> str:
    """The base card's pipeline tag, else one guessed from its architecture, else text-generation."""
    tag = base_meta.get("pipeline_tag")
    if isinstance(tag, str) and tag:
        return tag
    for architecture in base_meta.get("_architectures", []):
        for suffix, pipeline in _ARCHITECTURE_PIPELINES:
            if str(architecture).endswith(suffix):
                return pipeline
    return DEFAULT_PIPELINE_TAG


def _inherited_license(base_meta: Mapping[str, Any], base_id: str | None) -> dict[str, Any]:
    """license (and license_name / license_link for 'other') from the base's card; a relative link made absolute."""
    license_value = base_meta.get("license")
    if not license_value:
        return {}
    found = {key: base_meta[key] for key in _LICENSE_KEYS if base_meta.get(key)}
    link = found.get("license_link")
    if isinstance(link, str) and "://" not in link:
        if base_id:
            found["license_link"] = f"https://huggingface.co/{base_id}/blob/main/{link.removeprefix('./')}"
        else:
            del found["license_link"]  # a file of a local base: not in the merged repo
    return found
