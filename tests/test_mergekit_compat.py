"""mergekit configs run as they are: the corpus in merge_configs/mergekit/ converted and merged, mergekit's result
kept where one of our parameters expresses it, refusals naming the key (docs/SEMANTICS.md §3b)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evals.full_models import build_corpus_models
from mergekit_lite.cli.commands import main
from mergekit_lite.compat.mergekit import convert
from mergekit_lite.config import load_config
from mergekit_lite.errors import MergeConfigError

from .conftest import REPO, write_config
from .reference import load_checkpoint, ties_combine, trim

CORPUS = REPO / "merge_configs" / "mergekit"
#: one-document configs (mega.yml, several documents, is tests/test_mergekit_mega.py's)
CONFIGS = sorted(p.name for p in CORPUS.glob("*.yml") if "\n---" not in p.read_text())
#: the recorded outcome of every corpus config: the table in merge_configs/mergekit/README.md
OUTCOMES = dict(re.findall(r"^\| `([^`]+)` \| [^|]+ \| (runs.*|refused: .*) \|$", (CORPUS / "README.md").read_text(),
                           re.M))
REFUSED = {name.removeprefix("refused/"): re.escape(outcome.removeprefix("refused: "))
           for name, outcome in OUTCOMES.items() if outcome.startswith("refused: ")}


@pytest.fixture(scope="module")
def corpus(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the corpus with the models it names built beside it."""
    folder = tmp_path_factory.mktemp("mergekit") / "corpus"
    shutil.copytree(CORPUS, folder)
    return build_corpus_models(folder, demo)


def test_every_corpus_config_has_its_recorded_outcome() -> None:
    """One row per config in the corpus README: 'runs' for the configs beside it (each converted and run below, the
    mega file in test_mergekit_mega.py), 'refused: <words of the one-line refusal>' for those in refused/."""
    files = sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.yml"))
    assert files == sorted(OUTCOMES)
    assert all(outcome.startswith("runs") == ("/" not in name) for name, outcome in OUTCOMES.items())
    assert len(CONFIGS) >= 20 and len(REFUSED) >= 9


@pytest.mark.parametrize("name", CONFIGS)
def test_each_mergekit_config_converts_and_runs(corpus: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(corpus)
    runner = CliRunner()
    converted = runner.invoke(main, ["convert", name, "--out", f"ours-{name}"])
    assert converted.exit_code == 0, converted.output
    ours = corpus / f"converted-{name}"
    ours.write_text(converted.stdout)
    from_ours = runner.invoke(main, ["run", str(ours), "--no-progress"])
    from_mergekit = runner.invoke(main, ["run", name, "--no-progress", "--out", f"direct-{name}"])
    assert from_ours.exit_code == 0 and from_mergekit.exit_code == 0, from_ours.output + from_mergekit.output
    first, second = load_checkpoint(corpus / f"ours-{name}"), load_checkpoint(corpus / f"direct-{name}")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name,message", sorted(REFUSED.items()))
def test_features_we_lack_are_refused_naming_the_key(corpus: Path, name: str, message: str) -> None:
    result = CliRunner().invoke(main, ["convert", str(corpus / "refused" / name)])
    assert result.exit_code != 0 and re.search(message, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(MergeConfigError, match=message):
        load_config(corpus / "refused" / name)


def test_linear_with_the_base_listed_keeps_mergekits_weighted_average(corpus: Path) -> None:
    """mergekit: Σ wᵢWᵢ / Σ wᵢ with the base among the Wᵢ; ours: normalize: false and wᵢ / Σ w."""
    config = load_config(corpus / "linear_with_base.yml").with_output_path(corpus / "lwb")
    assert config.global_params == {"normalize": False} and config.weights == [0.3, 0.2]
    from mergekit_lite import merge
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    models = {n: load_checkpoint(corpus / n) for n in ("base", "ft_a", "ft_b")}
    for name, value in merged.items():
        expected = sum(w * models[n][name].double() for n, w in (("base", 0.5), ("ft_a", 0.3), ("ft_b", 0.2)))
        assert torch.allclose(value.double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0), name


def test_ties_keeps_mergekits_trim_vote_and_divisor(corpus: Path) -> None:
    from mergekit_lite import merge
    config = load_config(corpus / "ties.yml").with_output_path(corpus / "t")
    merged = load_checkpoint(merge(config, device="cpu", progress=False).output_dir)
    base = load_checkpoint(corpus / "base")
    fts = [(load_checkpoint(corpus / n), w, d) for n, w, d in (("ft_a", 0.5, 0.5), ("ft_b", 0.3, 0.5), ("ft_c", 0.2, 0.3))]
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
        w = base[name].double()
        updates = [weight * trim(ft[name].double() - w, density) for ft, weight, density in fts]
        expected = w + ties_combine(updates, [f[1] for f in fts], "sum", True, 1.0)
        assert torch.allclose(merged[name].double(), expected, atol=2e-6 * float(expected.abs().max()), rtol=0)


def test_conversion_keeps_mergekits_defaults_and_lists_what_it_cannot_express() -> None:
    dare = convert(yaml.safe_load((CORPUS / "dare_ties.yml").read_text()))
    assert dare.config["parameters"] == {"normalize": False}  # mergekit's default; ours is true
    assert [line.split(":")[0] for line in dare.differences] == ["DARE rescale", "DARE keep-masks"]
    bf16 = convert(yaml.safe_load((CORPUS / "ties_bf16.yml").read_text()))
    assert bf16.config["output"]["dtype"] == "bfloat16" and "computes in bfloat16" in bf16.differences[0]
    lora = convert(yaml.safe_load((CORPUS / "ties_lora.yml").read_text()))
    assert [a["path"] for a in lora.config["adapters"]] == ["adapters/style", "adapters/math"]
    assert "models" not in lora.config
    ta = convert({"merge_method": "task_arithmetic", "base_model": "b", "parameters": {"normalize": True},
                  "models": [{"model": "x", "parameters": {"weight": 0.5}}, {"model": "y", "parameters": {"weight": 1.5}}]})
    assert ta.config["parameters"] == {"lambda": 0.5}
    negative = convert({"merge_method": "ties", "base_model": "b",
                        "models": [{"model": "x", "parameters": {"weight": -0.5, "density": 0.5}}]})
    assert negative.differences and negative.differences[0].startswith("TIES divisor")


@pytest.mark.parametrize("data,message", [
    ({"merge_method": "ties", "models": [{"model": "x"}]}, r"'base_model': method 'ties' needs a base model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "other+lora"}]},
     r"puts a LoRA on a model other than the base"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}], "chat_template": "x"},
     r"mergekit key 'chat_template'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "bogus": 1}, r"mergekit key 'bogus' is not understood"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "b"}, {"model": "x"}]}, r"slerp: parameters need 't'"),
    ({"merge_method": "linear", "base_model": "b", "parameters": {"normalize": False},
      "models": [{"model": "x", "parameters": {"weight": 0.5}}, {"model": "y", "parameters": {"weight": 0.7}}]},
     r"summing to 1.2 scales the base weights"),
])
def test_mergekit_configs_we_cannot_run_as_mergekit_would_are_refused(data: dict, message: str) -> None:
    with pytest.raises(MergeConfigError, match=message):
        convert(data)


def test_the_readme_mergekit_commands_run(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command of the README's "Coming from mergekit" section, run in the corpus folder."""
    readme = (REPO / "README.md").read_text()
    section = re.search(r"## Coming from mergekit(.*?)\n## ", readme, re.S)
    assert section, "README lost its 'Coming from mergekit' section"
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
                for line in block.splitlines() if line.strip().startswith("merge ")]
    assert len(commands) >= 2
    monkeypatch.chdir(corpus)
    for command in commands:
        args = command.replace("merge_configs/mergekit/", "").split()[1:]
        if ">" in args:
            target = args[args.index(">") + 1]
            args = args[:args.index(">")]
            result = CliRunner().invoke(main, args)
            Path(target).write_text(result.stdout)
        else:
            result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"{command}: {result.output}"


# -- slices: plain merges written as slices ----------------------------------------------------------------------
def _merged(corpus: Path, config: str | Path, out: str) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, ["run", str(corpus / config), "--no-progress", "--out", str(corpus / out)])
    assert result.exit_code == 0, result.output
    return load_checkpoint(corpus / out)


def test_gradient_slerp_as_slices_gives_the_bytes_of_its_models_form(corpus: Path) -> None:
    """mergekit's gradient-slerp.yml (one slice over every layer) and slerp.yml (the same merge with models:)."""
    sliced, listed = _merged(corpus, "gradient-slerp.yml", "gs-slices"), _merged(corpus, "slerp.yml", "gs-models")
    assert sliced.keys() == listed.keys() and all(torch.equal(sliced[k], listed[k]) for k in sliced)
    assert any(not torch.equal(sliced[k], load_checkpoint(corpus / "base")[k]) for k in sliced)


def test_two_slices_with_their_own_t_equal_the_per_layer_filter_form(corpus: Path) -> None:
    """slerp_two_slices.yml: layer 0 at t = 0.2, layer 1 at the end of its own gradient (t = 0.8, a one-layer slice
    has t = 1), the embeddings at the first slice's t, the final norm and lm_head at the last slice's start (0.6)."""
    ours = write_config(corpus, {
        "base_model": "base", "method": "slerp", "models": [{"path": "ft_b"}],
        "parameters": {"t": [{"filter": "layers.0.", "value": 0.2}, {"filter": "layers.1.", "value": 0.8},
                             {"filter": "embed_tokens", "value": 0.2}, {"value": 0.6}]},
        "output": {"path": "two-slices-ours", "dtype": "float32"}}, "two_slices_ours.yaml")
    sliced = _merged(corpus, "slerp_two_slices.yml", "two-slices")
    by_filter = _merged(corpus, ours.name, "two-slices-ours")
    assert sliced.keys() == by_filter.keys() and all(torch.equal(sliced[k], by_filter[k]) for k in sliced)
    base, ft = load_checkpoint(corpus / "base"), load_checkpoint(corpus / "ft_b")
    halfway = {k for k in sliced if not torch.equal(sliced[k], base[k]) and not torch.equal(sliced[k], ft[k])}
    assert {"lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"} <= halfway


@pytest.mark.parametrize("slices,message", [
    ([{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "ft_a", "layer_range": [0, 1]}]}],
     r"'slices\[0\]': its sources take different layer ranges \(\[0, 2\] and \[0, 1\]\): that is layer stacking"),
    ([{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "ft_a", "layer_range": [0, 1]}]}],
     r"'slices\[0\]': the slices end at layer 1 but the base 'base' has 2 layers: that is layer stacking"),
    ([{"sources": [{"model": "base", "layer_range": [1, 2]}, {"model": "ft_a", "layer_range": [1, 2]}]}],
     r"'slices\[0\]': layers 0..0 before it are in no slice"),
    ([{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "ft_a", "layer_range": [0, 1]}]},
      {"sources": [{"model": "base", "layer_range": [1, 2]}, {"model": "ft_a", "layer_range": [1, 2]},
                   {"model": "ft_b", "layer_range": [1, 2]}]}],
     r"'slices\[1\]': it lists model 'ft_b', which slices\[0\] does not"),
    ([{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "base", "layer_range": [0, 2]}]}],
     r"'slices\[0\]': it lists model 'base' twice"),
    ([{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "ft_a", "layer_range": [0, 1]}],
       "parameters": {"t": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]}},
      {"sources": [{"model": "base", "layer_range": [1, 2]}, {"model": "ft_a", "layer_range": [1, 2]}],
       "parameters": {"t": 0.3}}],
     r"'parameters.t': slices\[1\] gives it other filters than slices\[0\]"),
    ([{"sources": [{"model": "base", "layer_range": "0-2"}]}], r"'slices\[0\].sources\[0\].layer_range': expected"),
    ([{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "ft_a", "layer_range": [0, 1]}],
       "parameters": {"weight": 0.5}},
      {"sources": [{"model": "base", "layer_range": [1, 2]}, {"model": "ft_a", "layer_range": [1, 2]}]}],
     r"'slices\[1\]': it gives no 'weight' \(nor does the config's parameters\) while another slice does"),
    ([{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "ft_a", "layer_range": [0, 1]}]},
      {"sources": [{"model": "base", "layer_range": [1, 2]},
                   {"model": "ft_a", "layer_range": [1, 2], "parameters": {"density": 0.5}}]}],
     r"'slices\[0\]': it gives model 'ft_a' no 'density'"),
    ([{"sources": [{"model": "base", "layer_range": [0, 2]}], "residual_weight": 0.5}],
     r"'slices\[0\].residual_weight' is not supported"),
    ([{"sources": [{"model": "org/not-here", "layer_range": [0, 2]}, {"model": "ft_a", "layer_range": [0, 2]}]}],
     r"'slices': cannot read the layer count of the base 'org/not-here'"),
])
def test_slices_that_are_not_one_plain_merge_are_refused_naming_the_slice(
        corpus: Path, slices: list, message: str) -> None:
    base = slices[0]["sources"][0]["model"]
    data = {"slices": slices, "merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5}}
    with pytest.raises(MergeConfigError, match=message):
        convert(data, base_dir=corpus)


def test_per_source_parameters_win_over_the_slice_and_global_ones(corpus: Path) -> None:
    """mergekit's order: a source's parameters, then its slice's, then the config's; per layer."""
    data = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"weight": 0.1},
            "slices": [{"sources": [{"model": "ft_a", "layer_range": [0, 1], "parameters": {"weight": 0.7}},
                                    {"model": "ft_b", "layer_range": [0, 1]}], "parameters": {"weight": 0.3}},
                       {"sources": [{"model": "ft_a", "layer_range": [1, 2]},
                                    {"model": "ft_b", "layer_range": [1, 2]}]}]}
    config = convert(data, base_dir=corpus).config
    later = [{"filter": "lm_head.weight", "value": 0.1}, {"filter": "model.norm.weight", "value": 0.1}]
    assert config["models"] == [{"path": "ft_a", "weight": [*later, {"value": [0.7, 0.1]}]},
                                {"path": "ft_b", "weight": [*later, {"value": [0.3, 0.1]}]}]


# -- nuslerp, multislerp, karcher, core_space from mergekit YAML ----------------------------------------------------
def test_spherical_methods_convert_with_mergekits_endpoints() -> None:
    two = [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]
    without_base = convert({"merge_method": "nuslerp", "models": two}).config
    assert without_base["base_model"] == "a" and without_base["parameters"] == {"base_weight": 0.7}
    assert without_base["models"] == [{"path": "b", "weight": 0.3}]
    with_base = convert({"merge_method": "nuslerp", "base_model": "w", "models": two,
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}).config
    assert with_base["parameters"] == {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    assert [m["path"] for m in with_base["models"]] == ["a", "b"]
    multi = convert({"merge_method": "multislerp", "base_model": "w", "models": [*two, {"model": "w"}],
                     "parameters": {"normalize_weights": False, "eps": 1e-6}}).config
    assert multi["parameters"] == {"normalize_weights": False, "eps": 1e-6} and len(multi["models"]) == 2
    karcher = convert({"merge_method": "karcher", "models": [*two, {"model": "c"}],
                       "parameters": {"max_iter": 3}}).config
    assert karcher["base_model"] == "a" and karcher["models"] == [{"path": "b"}, {"path": "c"}]
    assert karcher["parameters"] == {"max_iter": 3}  # mergekit's karcher has no weights: the given ones are unread


@pytest.mark.parametrize("data,message", [
    ({"merge_method": "nuslerp", "base_model": "w", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     r"mergekit nuslerp: needs exactly 2 models besides the base_model, got 1"),
    ({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b",
      "parameters": {"weight": 1}}, {"model": "c", "parameters": {"weight": 1}}]},
     r"mergekit nuslerp: needs exactly 2 models \(no base_model\), got 3"),
    ({"merge_method": "multislerp", "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1}}]},
     r"mergekit multislerp: model 'a' has no weight"),
    ({"merge_method": "core_space", "base_model": "w", "models": [{"model": "a"}]},
     r"'core_space' has no mergekit_lite equivalent: .*singular directions .*`space: core` runs ties"),
])
def test_spherical_configs_mergekit_would_not_run_are_refused(data: dict, message: str) -> None:
    with pytest.raises(MergeConfigError, match=message):
        convert(data)


def test_sce_converts_without_weights_and_with_variance_selection() -> None:
    sce = convert({"merge_method": "sce", "base_model": "w", "parameters": {"int8_mask": True},
                   "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b"}]}).config
    assert sce["method"] == "sce" and sce["models"] == [{"path": "a"}, {"path": "b"}] and "parameters" not in sce
    from mergekit_lite.config import MergeConfig
    data = convert({"merge_method": "sce", "base_model": "w", "parameters": {"select_topk": 0.3},
                    "models": [{"model": "a"}]}).config
    assert data["parameters"] == {"select_topk": 0.3}
    MergeConfig.from_dict(data)  # select_topk < 1 runs (tests/test_sce.py)


def test_nearswap_and_ram_convert_without_weights() -> None:
    near = convert({"merge_method": "nearswap", "base_model": "w", "parameters": {"t": 0.001},
                    "models": [{"model": "w"}, {"model": "a", "parameters": {"weight": 1.0}}]}).config
    assert near["models"] == [{"path": "a"}] and near["parameters"] == {"t": 0.001}
    with pytest.raises(MergeConfigError, match=r"mergekit nearswap: needs the base model and exactly one other"):
        convert({"merge_method": "nearswap", "base_model": "w", "parameters": {"t": 0.1},
                 "models": [{"model": "a"}, {"model": "b"}]})
    ram = convert({"merge_method": "ramplus_tl", "base_model": "w", "parameters": {"r": 0.2},
                   "models": [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "b"}]}).config
    assert ram["method"] == "ramplus_tl" and ram["models"] == [{"path": "a"}, {"path": "b"}]


def test_inputs_ending_in_one_folder_name_get_distinct_names() -> None:
    """mergekit YAML has no `name:`; inputs are told apart by folder name, so alike ones are named for it."""
    from mergekit_lite.config import MergeConfig

    def converted(*paths: str) -> tuple[list[str | None], list[str]]:
        conversion = convert({"merge_method": "task_arithmetic", "base_model": "b",
                              "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths]})
        MergeConfig.from_dict(conversion.config)  # accepted: the labels are distinct
        return [m.get("name") for m in conversion.config["models"]], conversion.differences

    names, notes = converted("runs/a/model", "runs/b/model", "other")
    assert names == ["a-model", "b-model", None]
    assert notes == ["2 inputs end in the folder name 'model': named 'a-model', 'b-model' (mergekit_lite tells "
                     "inputs apart by name)"]
    assert converted("org1/llama-ft", "org2/llama-ft/")[0] == ["org1-llama-ft", "org2-llama-ft"]  # Hub ids
    assert converted("x/model", "x/model")[0] == ["model-1", "model-2"]  # the parents do not tell them apart
    assert converted("model", "x/model")[0] == ["model-1", "model-2"]
