"""mergekit-mega files: several YAML documents in one file, later merges naming earlier outputs.

mergekit-mega (and its successor mergekit-multi) gives each intermediate merge a `name:`; another document uses
that name as a model (`model: gradient-slerp`, `base_model: gradient-slerp`), and the document without a name is
the final merge. We run the documents in file order, each written atomically as any `merge run`: a named one to
the folder `<name>` beside the file (mergekit-mega's layout with the file's folder as its out_path), or to its
`out_path:` when it gives one, the unnamed one to `<file stem>-merged`, and `--out` always to the last document.
A failure stops the chain, keeps the finished outputs and names the document that failed. Each document may be
mergekit's or ours (what `merge convert` prints for a mega file).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeConfigError, MergeError

#: keys of a mega document that are not part of the merge itself
_DOCUMENT_KEYS = ("name", "out_path")


@dataclass
class Document:
    """One document of a mega file: its place, its name (None for the final merge), its merge and its output."""

    number: int
    name: str | None
    data: dict[str, Any]
    output: str
    #: names of earlier documents whose outputs it reads
    needs: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How messages name it: `document 2 ('gradient-slerp-ties')`."""
        return f"document {self.number}" + (f" ('{self.name}')" if self.name else "")


def read_documents(path: str | Path) -> list[Any] | None:
    """The YAML documents of a config file when it holds more than one, else None (a plain config)."""
    from ..config import MAX_CONFIG_BYTES

    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return None  # read_config_data says so
        text = path.read_text(encoding="utf-8")
        if "---" not in text and "..." not in text:
            return None
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None  # read_config_data says what is wrong
    if len(documents) < 2:
        return None
    from ..config import _check_expanded_size

    for document in documents:  # aliases that expand to a huge structure, as for any config
        _check_expanded_size(document, path)
    return documents


def plan(path: Path, documents: list[Any], out: str | None) -> list[Document]:
    """Each document with its output folder and the earlier outputs it reads; refuse what cannot run in order."""
    planned: list[Document] = []
    names: dict[str, int] = {}
    unnamed: int | None = None
    for number, data in enumerate(documents, start=1):
        where = f"{path}: document {number}"
        if not isinstance(data, Mapping):
            raise MergeConfigError(f"{where}: must be a mapping of keys (a mergekit or mergekit_lite merge config)")
        name = data.get("name")
        if name is not None:
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise MergeConfigError(f"{where}: 'name' must be a folder name without slashes, got {name!r}")
            if name in names:
                raise MergeConfigError(f"{where}: name '{name}' is also document {names[name]}'s; names must differ")
            names[name] = number
        elif "merge_method" not in data or data.get("out_path") is not None:
            pass  # its output folder is its own: ours name it under output, out_path names it
        elif unnamed is not None:
            raise MergeConfigError(f"{where}: documents {unnamed} and {number} have no 'name'; only the final merge "
                                   "may go without one")
        else:
            unnamed = number
        out_path = data.get("out_path")
        if out_path is not None and (not isinstance(out_path, str) or not out_path):
            raise MergeConfigError(f"{where}: 'out_path' must be a folder path, got {out_path!r}")
        merge = {key: value for key, value in data.items() if key not in _DOCUMENT_KEYS}
        if "merge_method" in merge:
            output = out_path or name or f"{path.stem}-merged"
        else:
            output = out_path or _our_output(merge) or name or f"{path.stem}-merged"
        planned.append(Document(number, name if isinstance(name, str) else None, merge, output))
    if out is not None:
        planned[-1].output = out
    outputs = [document.output for document in planned]
    for document in planned:
        if outputs.count(document.output) > 1:
            raise MergeConfigError(f"{path}: {document.label} writes to '{document.output}' as another document does")
    labels = {document.name: document for document in planned if document.name}
    labels.update({document.output: document for document in planned})
    for document in planned:
        needs = []
        for reference in _references(document.data):
            source = labels.get(reference)
            if source is None or source is document:
                if source is document:
                    raise MergeConfigError(f"{path}: {document.label} reads its own output '{reference}'")
                continue
            if source.number > document.number:
                raise MergeConfigError(f"{path}: {document.label} reads '{reference}', the output of "
                                       f"{source.label}, which comes after it; put that document first")
            needs.append(reference)
        document.needs = tuple(dict.fromkeys(needs))
    return planned


def _our_output(data: Mapping[str, Any]) -> str | None:
    output = data.get("output")
    if isinstance(output, Mapping):
        return output.get("path") if isinstance(output.get("path"), str) else None
    return output if isinstance(output, str) else None


def _references(data: Mapping[str, Any]) -> list[str]:
    """Every model reference of a document (mergekit's or ours), without a `+lora` part."""
    found: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, Mapping):
            value = value.get("model", value.get("path"))
            if isinstance(value, Mapping):
                value = value.get("path")
        if isinstance(value, str):
            found.append(value.partition("+")[0])

    add(data.get("base_model"))
    for section in ("models", "adapters"):
        for entry in data.get(section) or [] if isinstance(data.get(section), list) else []:
            add(entry.get("model", entry.get("path")) if isinstance(entry, Mapping) else entry)
    for item in data.get("slices") or [] if isinstance(data.get("slices"), list) else []:
        for source in (item.get("sources") or []) if isinstance(item, Mapping) else []:
            add(source.get("model") if isinstance(source, Mapping) else None)
    return found


def _renamed(data: dict[str, Any], outputs: Mapping[str, str]) -> dict[str, Any]:
    """The document with each earlier document's name replaced by its output folder."""
    def swap(value: Any) -> Any:
        if isinstance(value, str):
            model, plus, lora = value.partition("+")
            return outputs[model] + plus + lora if model in outputs else value
        if isinstance(value, Mapping):
            changed = dict(value)
            for key in ("model", "path"):
                if key in changed:
                    changed[key] = swap(changed[key])
            return changed
        return value

    data = copy.deepcopy(data)
    if "base_model" in data:
        data["base_model"] = swap(data["base_model"])
    for section in ("models", "adapters"):
        if isinstance(data.get(section), list):
            data[section] = [swap(entry) for entry in data[section]]
    if isinstance(data.get("slices"), list):
        for item in data["slices"]:
            if isinstance(item, dict) and isinstance(item.get("sources"), list):
                item["sources"] = [swap(source) for source in item["sources"]]
    return data


def config_data(document: Document, path: Path, outputs: Mapping[str, str],
                stand_ins: Mapping[str, Path] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Our config mapping for one document (its output set) and the differences from mergekit's result;
    `stand_ins`: for slices over an earlier output not written yet, the folder read in its place (its base)."""
    from .mergekit import convert, is_mergekit_config

    data = _renamed(document.data, outputs)
    if is_mergekit_config(data):
        conversion = convert(data, output=document.output, base_dir=path.resolve().parent, stand_ins=stand_ins)
        return conversion.config, conversion.differences
    data["output"] = ({**data["output"], "path": document.output} if isinstance(data.get("output"), Mapping)
                      else {"path": document.output})
    return data, []


def _outputs(planned: list[Document]) -> dict[str, str]:
    outputs = {document.name: document.output for document in planned if document.name}
    outputs.update({document.output: document.output for document in planned})
    return outputs


def converted(path: Path, documents: list[Any], out: str | None) -> list[tuple[Document, dict[str, Any], list[str]]]:
    """Every document as our config (for `merge convert`), each checked to load."""
    from ..config import MergeConfig

    planned = plan(path, documents, out)
    outputs = _outputs(planned)
    folder = path.resolve().parent
    stand_ins: dict[str, Path] = {}  # an earlier output not written yet -> its merge's base (same layers, names)
    result = []
    for document in planned:
        try:
            data, differences = config_data(document, path, outputs, stand_ins)
            config = MergeConfig.from_dict(data, folder)
        except MergeConfigError as error:
            raise MergeConfigError(f"{path}: {document.label}: {error}") from None
        base = str(data["base_model"])
        stand_ins[document.output] = stand_ins.get(base, config.resolve_path(base))
        result.append((document, data, differences))
    return result


def run_if_mega(config_path: str, out: str | None, dry_run: bool, echo: Callable[[str], None],
                **options: Any) -> bool:
    """Run a mega file's documents in order (`merge run`); False when the file holds one document."""
    path = Path(config_path)
    documents = read_documents(path)
    if documents is None:
        return False
    from ..api import describe_plan, merge
    from ..config import MergeConfig
    from .mergekit import logger

    planned = plan(path, documents, str(Path(out).resolve()) if out else None)  # --out: from the working folder
    outputs = _outputs(planned)
    for document in planned:  # checked before anything runs: all but slices over an earlier output (their layer
        if not (document.needs and "slices" in document.data):  # count is read from the base's files)
            try:
                checked = MergeConfig.from_dict(config_data(document, path, outputs)[0], path.resolve().parent)
                if not dry_run:  # an output that may not be replaced stops the chain before its first merge (#23)
                    from ..writers.ownership import local_inputs
                    from ..writers.preflight import preflight_output

                    preflight_output(checked.output_path, bool(options.get("overwrite")), local_inputs(checked))
            except MergeError as error:
                failed = copy.copy(error)
                failed.args = (f"{path}: {document.label}: {error}",)
                raise failed from None
    finished: list[str] = []
    stand_ins: dict[str, Path] = {}  # --dry-run: an earlier output not written -> its merge's base (same layers)
    for document in planned:
        try:
            data, differences = config_data(document, path, outputs, stand_ins)
            config = MergeConfig.from_dict(data, path.resolve().parent)
            if dry_run:
                base = str(data["base_model"])
                stand_ins[document.output] = stand_ins.get(base, config.resolve_path(base))
                echo(f"{document.label} of {len(planned)}:")
                if document.needs and any(not config.resolve_path(outputs[n]).exists() for n in document.needs):
                    echo(f"  reads {', '.join(document.needs)} (written by the documents before it)")
                    continue
                echo(describe_plan(config, device=options["device"], chunk_rows=options["chunk_rows"],
                                   max_memory=options["max_memory"], allow_pickle=options["allow_pickle"],
                                   workers=options["workers"]))
                continue
            for line in differences:
                logger.warning("mergekit difference (%s): %s", document.label, line)
            result = merge(config, **options)
        except MergeError as error:
            done = f"; finished and kept: {', '.join(finished)}" if finished else "; nothing was written"
            failed = copy.copy(error)
            failed.args = (f"{path}: {document.label} of {len(planned)} failed: {error}{done}",)
            raise failed from None
        finished.append(str(result.output_dir))
        echo(f"{document.label} of {len(planned)}: {result.summary()}")
    return True
