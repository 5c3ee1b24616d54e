"""The model card (README.md): Hub metadata plus exactly how the merge was made (SEMANTICS §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..config import MergeConfig
from ..version import tool_version

TAGS = ["merge", "mergekit_lite"]


def hub_id_or_none(reference: str, local_path: Path) -> str | None:
    """The reference when it names a Hub repo, None when it is a local folder (the Hub rejects local paths)."""
    if local_path.exists() or reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        return None
    return reference.split("@", 1)[0]


def render_card(config: MergeConfig, extra_sections: list[str] | None = None) -> str:
    """The model card text: YAML front matter and a body that lets anyone reproduce the merge."""
    method = config.merge_method
    base_id = hub_id_or_none(config.base_model, config.resolve_path(config.base_model))
    data: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(TAGS),
        "base_model_relation": "merge",
    }
    if base_id:
        data["base_model"] = base_id
    card_data = ModelCardData(**data)
    name = Path(config.output.path).name
    params = ", ".join(f"`{k}={v}`" for k, v in config.global_params.items()) or "none"
    paper = f" ([paper]({method.paper_url}))" if method.paper_url else ""
    per_adapter_keys = sorted({k for p in config.adapter_params for k in p})
    header = "| # | adapter | weight |" + "".join(f" {k} |" for k in per_adapter_keys)
    rule = "|---|---|---|" + "---|" * len(per_adapter_keys)
    rows = []
    for index, (spec, own) in enumerate(zip(config.adapters, config.adapter_params)):
        hub = hub_id_or_none(spec.path, config.resolve_path(spec.path))
        shown = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{spec.path}`"
        rows.append(f"| {index} | {shown} | {spec.weight:g} |" + "".join(f" {own.get(k)} |" for k in per_adapter_keys))
    base_shown = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{config.base_model}` (local)"
    body = "\n".join(
        [
            f"# {name}",
            "",
            f"A merge of {len(config.adapters)} LoRA adapter(s) into {base_shown}, made with "
            f"mergekit_lite {tool_version()}.",
            "",
            "## Method",
            "",
            f"**{method.display_name}**{paper}: {method.summary}.",
            "",
            f"Parameters: {params}. Seed: `{config.seed}`. Arithmetic in float32, rounded once to the output dtype "
            f"(`{config.output.dtype or 'same as base'}`).",
            "",
            "## Adapters",
            "",
            header,
            rule,
            *rows,
            "",
            *(extra_sections or []),
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
