"""The model card: metadata the Hub accepts (never a local path) and a body that tells how the merge was made."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard

from mergekit_lite import MergeConfig
from mergekit_lite.hub.publish import local_paths_in_metadata
from mergekit_lite.hub.resolve import resolve_model_dir
from mergekit_lite.writers.card import render_card

from .configs import merge_config
from .hub_fixtures import hub, isolate_client, upload_folder  # noqa: F401
from .hub_standin import HubStandIn


@pytest.fixture(autouse=True)
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline with an empty private cache: rendering a card never needs the network."""
    isolate_client(monkeypatch, tmp_path, offline=True)


def config_for(folder: Path, base: str, adapters: list[dict[str, Any]], method: str = "task_arithmetic",
               **extra: Any) -> MergeConfig:
    return merge_config(base, adapters, "out/my-merge", method, folder, seed=11, **extra)


def split(card: str) -> tuple[dict[str, Any], str]:
    _, front, body = card.split("---", 2)
    return yaml.safe_load(front), body


def local_base(demo: Path, tmp_path: Path, card: str | None = None, architecture: str | None = None) -> Path:
    base = tmp_path / "base"
    shutil.copytree(demo / "base", base)
    if card is not None:
        (base / "README.md").write_text(card)
    if architecture is not None:
        config = (base / "config.json").read_text().replace('"LlamaForCausalLM"', f'"{architecture}"')
        (base / "config.json").write_text(config)
    return base


def test_a_hub_base_is_named_by_its_id_and_hub_adapters_are_linked(tmp_path: Path) -> None:
    config = config_for(tmp_path, "org/base", [{"path": "org/style"}, {"path": "org/math@v2", "weight": -0.5}])
    meta, body = split(render_card(config))
    assert meta["base_model"] == "org/base"
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and {"merge", "mergekit_lite"} <= set(meta["tags"])
    assert "license" not in meta  # nothing known about the base: no license is invented
    assert "into [org/base](https://huggingface.co/org/base)" in body
    assert "| 0 | [org/style](https://huggingface.co/org/style) | 1 | 1 |" in body
    assert "| 1 | [org/math@v2](https://huggingface.co/org/math/tree/v2) | -0.5 | 1 |" in body
    assert local_paths_in_metadata(meta) == []


def test_a_local_base_is_not_in_the_metadata_and_its_license_is_inherited(demo: Path, tmp_path: Path) -> None:
    base = local_base(demo, tmp_path, "---\nlicense: mit\nlanguage: en\n---\n# base\n")
    config = config_for(tmp_path, "base", [{"path": str(demo / "adapters" / "style"), "name": "style"}])
    meta, body = split(render_card(config))
    assert "base_model" not in meta and meta["license"] == "mit"
    assert "language" not in meta  # only the license is inherited, not the base's other claims
    assert "into `base` (local)" in body and f"style: `{demo / 'adapters' / 'style'}`" in body
    assert str(base) not in yaml.safe_dump(meta)
    assert local_paths_in_metadata(meta) == []


def test_an_other_license_keeps_its_name_and_drops_a_link_into_a_local_base(demo: Path, tmp_path: Path) -> None:
    local_base(demo, tmp_path, "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    meta, _ = split(render_card(config_for(tmp_path, "base", [{"path": "adapter"}])))
    assert meta["license"] == "other" and meta["license_name"] == "tiny-license"
    assert "license_link" not in meta  # ./LICENSE of a local folder does not travel with the merge


def test_a_hub_base_license_link_is_made_absolute(hub: HubStandIn, demo: Path, tmp_path: Path) -> None:
    hosted = local_base(demo, tmp_path, "---\nlicense: other\nlicense_name: tiny\nlicense_link: ./LICENSE\n---\n")
    upload_folder("org/licensed", hosted)
    config = config_for(tmp_path / "elsewhere", "org/licensed", [{"path": "adapter"}])
    resolve_model_dir(config, "org/licensed", kind="base")  # as a merge does first: the snapshot lands in the cache
    meta, _ = split(render_card(config))
    assert meta["base_model"] == "org/licensed" and meta["license_name"] == "tiny"
    assert meta["license_link"] == "https://huggingface.co/org/licensed/blob/main/LICENSE"


def test_the_pipeline_tag_comes_from_the_base_card_or_its_architecture(demo: Path, tmp_path: Path) -> None:
    local_base(demo, tmp_path, architecture="LlamaForSequenceClassification")
    meta, _ = split(render_card(config_for(tmp_path, "base", [{"path": "adapter"}])))
    assert meta["pipeline_tag"] == "text-classification"
    (tmp_path / "base" / "README.md").write_text("---\npipeline_tag: feature-extraction\n---\n")
    meta, _ = split(render_card(config_for(tmp_path, "base", [{"path": "adapter"}])))
    assert meta["pipeline_tag"] == "feature-extraction"


def test_eval_results_become_model_index_results_and_a_table(tmp_path: Path) -> None:
    config = config_for(tmp_path, "org/base", [{"path": "org/style"}])
    card = render_card(config, eval_results={"capitals": {"acc": 0.75, "acc_norm": 0.5}, "arith": {"exact_match": 1}})
    meta, body = split(card)
    (index,) = meta["model-index"]
    assert index["name"] == "my-merge"
    results = {(r["task"]["name"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert results == {("capitals", "acc"): 0.75, ("capitals", "acc_norm"): 0.5, ("arith", "exact_match"): 1.0}
    assert all(r["dataset"]["name"] in ("capitals", "arith") for r in index["results"])
    assert "## Scores" in body and "## Evaluation" not in body and "| capitals | acc | 0.75 |" in body and "| arith | exact_match | 1 |" in body
    parsed = ModelCard(card).data  # the client reads it back as eval results
    assert len(parsed.eval_results) == 3 and parsed.model_name == "my-merge"
    assert "model-index" not in split(render_card(config))[0]


def test_extra_sections_still_land_before_reproduce(tmp_path: Path) -> None:
    config = config_for(tmp_path, "org/base", [{"path": "org/style"}])
    table = "## Evaluation\n\n| task | acc |\n|---|---|\n| capitals | 0.9 |"
    card = render_card(config, [table])
    assert card.index("| capitals | 0.9 |") < card.index("## Reproduce")
    assert card == render_card(config, extra_sections=[table])


def test_density_is_shown_per_adapter_for_sparsifying_methods(tmp_path: Path) -> None:
    config = config_for(tmp_path, "org/base", [{"path": "org/a"}, {"path": "org/b", "density": 0.3}], method="ties",
                        parameters={"density": 0.6})
    _, body = split(render_card(config))
    assert "| 0 | [org/a](https://huggingface.co/org/a) | 1 | 0.6 |" in body
    assert "| 1 | [org/b](https://huggingface.co/org/b) | 1 | 0.3 |" in body
    assert "**TIES** (`ties`)" in body and "Seed: `11`" in body and "```yaml" in body


def test_the_card_says_what_a_weight_means_for_the_method(tmp_path: Path) -> None:
    """Task arithmetic scales each task vector by its weight; NuSLERP's weights only set t (registry row)."""
    inputs = [{"path": "org/a", "weight": 1}, {"path": "org/b", "weight": 3}]
    _, scaled = split(render_card(config_for(tmp_path, "org/base", inputs)))
    assert "Weight is the signed wᵢ of each task vector; density" in scaled
    _, nuslerp = split(render_card(config_for(tmp_path, "org/base", inputs, method="nuslerp")))
    assert ("Weight is what sets the interpolation point t = w₂/(w₁ + w₂) (one input: t = w₁/(base_weight + w₁)); "
            "the weights do not scale the endpoints; density") in nuslerp
    assert "signed wᵢ" not in nuslerp


def test_the_title_is_the_repo_name_when_the_config_pushes(tmp_path: Path) -> None:
    config = config_for(tmp_path, "org/base", [{"path": "org/style"}])
    pushed = MergeConfig.from_dict({**config.to_dict(), "output": {"path": "out/x", "push_to_hub": "me/fancy-merge"}},
                                   tmp_path)
    assert "\n# fancy-merge\n" in render_card(pushed) and "\n# my-merge\n" in render_card(config)
