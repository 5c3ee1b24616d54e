"""`merge inspect` with calibration prompts: the interference matrix (inspection/interference.py).

The proof: every log-likelihood of the matrix, measured on the base with the adapters as branches, equals the
log-likelihood of a model actually merged by `merge run` (base + τᵢ + τⱼ written to disk, loaded with
transformers), scored from the definition one sequence at a time in float64; identical adapters and an adapter
with its negation give the closed forms; the scoring batch and the device change nothing; bad input is one line.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_lite.cli import main
from mergekit_lite.inspection import interference as ifr
from mergekit_lite.inspection import report
from mergekit_lite.inspection.inputs import inspect_config_from_dict, load_inspect_config, open_inputs

from .conftest import REPO, write_config

PROMPTS = {
    "facts": ["the capital of france is", "water boils at", "the sun is a", "a year has", "the moon is made of",
              "paris is in", "the earth is", "iron is a"],
    "math": ["two plus two is", "ten minus three is", "half of eight is", "three times three is", "one plus one is",
             "six minus two is", "twice five is", "zero plus nine is"],
    "style": ["dear sir, i write to", "once upon a time", "in conclusion, we", "with kind regards,", "the weather today",
              "i would like to", "it was a dark and", "thank you for your"],
}
SIZE = 6


def _prompts(folder: Path, name: str) -> Path:
    path = folder / f"{name}.txt"
    path.write_text("\n".join(PROMPTS[name]) + "\n")
    return path


def demo_config(folder: Path, demo: Path, entries: Sequence[tuple[str, Path, str]], **extra: Any) -> Path:
    """A config over the demo base: (name, adapter folder, prompts of) per adapter, no method."""
    adapters = [{"path": str(path), "name": name, "calibration": str(_prompts(folder, prompts)),
                 "calibration_size": SIZE} for name, path, prompts in entries]
    return write_config(folder, {"base_model": str(demo / "base"), "adapters": adapters, **extra})


@pytest.fixture(autouse=True)
def _teacher_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "cache"))


def measured(config_path: Path, **options: Any) -> ifr.Interference:
    loaded = load_inspect_config(config_path)
    config = loaded.config
    specs = ifr.calibration_specs(config, loaded.calibration)
    assert specs is not None
    sources = ifr.sources_of(config, specs, None)
    with open_inputs(config) as inputs:
        return ifr.measure(inputs, sources, seed=config.seed, **options)


@pytest.fixture(scope="module")
def three(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ifr.Interference]:
    """The demo's three adapters, each with its own prompts, measured once (grid and weights included)."""
    folder = tmp_path_factory.mktemp("three")
    config = demo_config(folder, demo, [(n, demo / "adapters" / n, n) for n in ("facts", "math", "style")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGEKIT_LITE_CACHE", str(folder / "cache"))
        return config, measured(config)


# ------------------------------------------------------------------------------------------------------------
# the reference: a real model on disk, scored from the definition
# ------------------------------------------------------------------------------------------------------------


def reference_ll(model_dir: Path, examples: Any) -> float:
    """Mean log p(continuation token | everything before it), one unpadded sequence at a time, float64 sums."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, continuation in zip(examples.prompts, examples.continuations):
            ids = torch.tensor([prompt + continuation])
            log_p = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for k, token in enumerate(continuation):
                total += float(log_p[len(prompt) - 1 + k, token])
                count += 1
    return total / count


def merged(folder: Path, demo: Path, adapters: Sequence[tuple[Path, float]], name: str) -> Path:
    """base + Σ wₖτₖ written by our merge (task_arithmetic, λ 1, float32)."""
    from mergekit_lite.api import merge
    from mergekit_lite.config import load_config

    config = write_config(folder, {
        "base_model": str(demo / "base"), "method": "task_arithmetic", "parameters": {"lambda": 1.0},
        "adapters": [{"path": str(p), "weight": w, "name": f"a{k}"} for k, (p, w) in enumerate(adapters)],
        "output": {"path": str(folder / name), "dtype": "float32"}}, f"{name}.yaml")
    merge(load_config(config), device="cpu", progress=False)
    return folder / name


@pytest.mark.slow
def test_branch_log_likelihoods_equal_merged_models_on_disk(three: tuple[Path, ifr.Interference], demo: Path,
                                                           tmp_path: Path) -> None:
    _, result = three
    names = ("facts", "math", "style")
    paths = [demo / "adapters" / n for n in names]
    ex = result.examples
    assert all(len(e) == SIZE for e in ex) and result.prompts == [SIZE] * 3
    base = reference_ll(demo / "base", ex[0])
    assert result.base_ll[0] == pytest.approx(base, abs=1e-4)
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        alone_j = merged(tmp_path, demo, [(paths[j], 1.0)], f"alone{j}")
        pair = merged(tmp_path, demo, [(paths[i], 1.0), (paths[j], 1.0)], f"pair{i}{j}")
        assert result.alone_ll[i][j] == pytest.approx(reference_ll(alone_j, ex[i]), abs=1e-4)
        assert result.pair_ll[i][j] == pytest.approx(reference_ll(pair, ex[i]), abs=1e-4)
        own = merged(tmp_path, demo, [(paths[i], 1.0)], f"own{i}")
        assert result.own(i) == pytest.approx(reference_ll(own, ex[i]), abs=1e-4)
    # the n-way merge at the suggested weights, as the report states it
    assert result.weights is not None and set(result.weights) <= set(ifr.WEIGHT_GRID)
    chosen = merged(tmp_path, demo, list(zip(paths, result.weights)), "suggested")
    for i in range(3):
        assert result.merged_ll["suggested"][i] == pytest.approx(reference_ll(chosen, ex[i]), abs=1e-4)
    # the matrix's definitions
    for i, j in itertools.permutations(range(3), 2):
        assert result.cost(i, j) == pytest.approx(result.own(i) - result.pair_ll[i][j])
        assert result.share(i, j) == pytest.approx(result.cost(i, j) / (result.own(i) - result.base_ll[i]))


@pytest.mark.slow
def test_identical_adapters_and_a_negation_give_the_closed_forms(demo: Path, tmp_path: Path) -> None:
    facts = demo / "adapters" / "facts"
    negated = tmp_path / "negated"
    shutil.copytree(facts, negated)
    weights = load_file(str(negated / "adapter_model.safetensors"))
    save_file({k: (-v if "lora_B" in k else v) for k, v in weights.items()}, str(negated / "adapter_model.safetensors"))
    config = demo_config(tmp_path, demo, [("a", facts, "facts"), ("b", facts, "facts"), ("neg", negated, "facts")])
    result = measured(config, weights=False)
    a, b, neg = 0, 1, 2
    assert result.gain(a) > 0 and result.own(a) == pytest.approx(result.own(b), abs=1e-6)
    # b alone is a: it reproduces a's whole gain, and the matrix is symmetric between the two
    assert result.alone_ll[a][b] == pytest.approx(result.own(a), abs=1e-6)
    assert result.share(a, b) == pytest.approx(result.share(b, a), abs=1e-6)
    # τ − τ = 0: adding the negation takes exactly the whole gain; alone it moves a's answers below the base
    assert result.pair_ll[a][neg] == pytest.approx(result.base_ll[a], abs=1e-6)
    assert result.share(a, neg) == pytest.approx(1.0, abs=1e-5)
    assert result.alone_ll[a][neg] < result.base_ll[a]
    findings = {f["finding"]: f for f in ifr.findings(result, None)}
    assert "costly_adapter" in findings


@pytest.mark.slow
def test_the_scoring_batch_changes_nothing(three: tuple[Path, ifr.Interference]) -> None:
    config, result = three
    for batch_size in (1, 5):
        other = measured(config, batch_size=batch_size, weights=False)
        assert other.examples[0].continuations == result.examples[0].continuations
        for name in ("alone_ll", "pair_ll"):
            for row, expected in zip(getattr(other, name), getattr(result, name)):
                assert row == pytest.approx(expected, abs=1e-5)
        assert other.base_ll == pytest.approx(result.base_ll, abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu_scores(three: tuple[Path, ifr.Interference]) -> None:
    from mergekit_lite.calibration.model import BranchedModel

    config, result = three
    loaded = load_inspect_config(config)
    with open_inputs(loaded.config) as inputs:
        model = BranchedModel(inputs, device="cuda", dtype=torch.float32)
        try:
            scorer = ifr.Scorer(model, result.examples, 4)
            for i, j in itertools.permutations(range(3), 2):
                assert scorer.ll(i, scorer.coefficients({j: 1.0})) == pytest.approx(result.alone_ll[i][j], abs=1e-4)
                assert scorer.ll(i, scorer.coefficients({i: 1.0, j: 1.0})) == pytest.approx(result.pair_ll[i][j],
                                                                                            abs=1e-4)
        finally:
            model.close()


# ------------------------------------------------------------------------------------------------------------
# the report, the figure and suggested_merge.yaml
# ------------------------------------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["inspect", *args, "--no-progress"])


@pytest.mark.slow
def test_the_report_carries_the_matrix_the_verdict_and_a_runnable_config(three: tuple[Path, ifr.Interference],
                                                                         tmp_path: Path) -> None:
    config, result = three
    out = tmp_path / "report"
    run = invoke(str(config), "--out", str(out))
    assert run.exit_code == 0, run.output
    assert "interference (measured" in run.output and "verdict (measured):" in run.output
    data = json.loads((out / "inspect.json").read_text())
    block = data["interference"]
    assert tuple(block) == report.INTERFERENCE_KEYS
    assert tuple(block["calibration"][0]) == report.INTERFERENCE_CALIBRATION_KEYS
    assert tuple(block["settings"]) == report.INTERFERENCE_SETTINGS_KEYS
    assert tuple(block["suggested"]) == report.SUGGESTED_KEYS
    # the same numbers as measured directly (same cached teachers, same documents)
    for i, j in itertools.permutations(range(3), 2):
        assert block["cost_share"][i][j] == pytest.approx(result.share(i, j), abs=1e-6)
    assert block["suggested"]["weights"] == dict(zip(result.labels, result.weights))
    assert "interference.png" in data["figures"] and (out / "interference.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Interference (measured on calibration prompts)" in md and "### Verdict (measured)" in md
    # suggested_merge.yaml is a merge config of ours whose paths resolve from the report folder
    from mergekit_lite.config import load_config

    suggested = load_config(out / ifr.SUGGESTED_YAML)
    assert suggested.method == "task_arithmetic" and suggested.weights == result.weights
    assert all(suggested.resolve_path(a.path).is_dir() for a in suggested.adapters)
    assert suggested.output_path == (tmp_path / "report_suggested_merge").resolve()


@pytest.mark.slow
def test_one_adapter_has_a_gain_and_nothing_to_interfere_with(demo: Path, tmp_path: Path) -> None:
    config = demo_config(tmp_path, demo, [("facts", demo / "adapters" / "facts", "facts")])
    out = tmp_path / "report"
    run = invoke(str(config), "--out", str(out), "--no-plots", "--calibration-size", "3")
    assert run.exit_code == 0, run.output
    block = json.loads((out / "inspect.json").read_text())["interference"]
    assert block["calibration"][0]["prompts"] == 3 and block["suggested"] is None and block["offender"] is None
    assert [f["finding"] for f in block["verdict"]] == ["single_adapter"]
    assert sorted(p.name for p in out.iterdir()) == [".mergekit_lite_output.json", "inspect.json", "report.md"]


def test_the_measured_verdict_names_the_costly_adapter_and_its_weight() -> None:
    """A synthetic matrix: 'c' costs 'a' 62% and 'b' 140% of their gains; halving it keeps every pair under 30%."""
    labels = ["a", "b", "c"]
    base, own = [-3.0, -3.0, -3.0], [-1.0, -1.0, -1.0]  # gains 2
    cost = {(0, 1): 0.1, (0, 2): 1.24, (1, 0): 0.1, (1, 2): 2.8, (2, 0): 0.1, (2, 1): 0.1}
    pair = [[own[i] if i == j else own[i] - cost[(i, j)] for j in range(3)] for i in range(3)]
    result = ifr.Interference(labels, ["x"] * 3, [4] * 3, [20] * 3, base, [list(r) for r in pair], pair, "cpu",
                              "float32", 16, 16)
    g = ifr.WEIGHT_GRID

    def loss(i: int, j: int, wi: float, wj: float) -> float:  # own weight below 1 loses (1 − w)·gain; j costs wⱼ²·c
        return own[i] - 2 * (1 - wi) - (wj ** 2) * cost[(i, j)]

    result.grid = {(i, j): [[loss(i, j, a, b) for b in g] for a in g] for i, j in itertools.permutations(range(3), 2)}
    result.weights = ifr.choose_weights(result)
    assert result.weights[2] < 1.0 and result.weights[2] == min(result.weights)
    worst, _ = ifr.suggested_loss(result)
    assert worst == pytest.approx(max(result.pair_loss(i, j, g.index(result.weights[i]), g.index(result.weights[j]))
                                      for i, j in itertools.permutations(range(3), 2)))
    # exhaustive: no grid point does better
    assert all(ifr._objective(result, c)[0] >= worst - 1e-12 for c in itertools.product(range(len(g)), repeat=3))
    texts = [f["text"] for f in ifr.findings(result, "suggested_merge.yaml")]
    assert texts[0].startswith("'c' costs 'b' 140% and 'a' 62% of their gains")
    assert "use `method: learned`" in texts[0] and "suggested_merge.yaml" in texts[-1]
    assert ifr.offender(result) == (2, pytest.approx((0.62 + 1.4) / 2))


def test_calibration_keys_are_the_adapters_data_for_a_data_free_method(demo: Path, tmp_path: Path) -> None:
    data = {"base_model": str(demo / "base"), "parameters": {"calibration_template": "Q: {{q}}"},
            "adapters": [{"path": str(demo / "adapters" / "facts"), "calibration": "a.jsonl"},
                         {"path": str(demo / "adapters" / "math"), "calibration": "b.jsonl", "calibration_size": 3}]}
    loaded = inspect_config_from_dict(data, tmp_path)
    assert loaded.calibration == [{"calibration_template": "Q: {{q}}", "calibration": "a.jsonl"},
                                  {"calibration_template": "Q: {{q}}", "calibration": "b.jsonl",
                                   "calibration_size": 3}]
    sources = ifr.sources_of(loaded.config, ifr.calibration_specs(loaded.config, loaded.calibration), None)
    assert [s.size for s in sources] == [64, 3] and sources[0].template == "Q: {{q}}"
    assert [s.size for s in ifr.sources_of(loaded.config, loaded.calibration, 5)] == [5, 5]
    # a data-aware method keeps them as its own parameters, and inspect reads them from there
    regmean = inspect_config_from_dict({**data, "method": "regmean"}, tmp_path)
    assert regmean.calibration is None
    specs = ifr.calibration_specs(regmean.config, None)
    assert specs is not None and [s["calibration"] for s in specs] == ["a.jsonl", "b.jsonl"]
    # no calibration anywhere: nothing to measure
    plain = inspect_config_from_dict({"base_model": data["base_model"], "adapters": [a["path"] for a in data["adapters"]]},
                                     tmp_path)
    assert plain.calibration is None and ifr.calibration_specs(plain.config, None) is None


# ------------------------------------------------------------------------------------------------------------
# without calibration data, and bad input
# ------------------------------------------------------------------------------------------------------------


def test_without_calibration_inspect_says_in_one_line_what_it_would_add(demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"base_model": str(demo / "base"),
                                     "adapters": [str(demo / "adapters" / n) for n in ("facts", "math")]})
    out = tmp_path / "report"
    run = invoke(str(config), "--out", str(out), "--no-plots")
    assert run.exit_code == 0, run.output
    assert run.output.count("no calibration data: give each adapter `calibration: prompts.jsonl`") == 1
    data = json.loads((out / "inspect.json").read_text())
    assert data["interference"] is None and data["schema_version"] == report.SCHEMA_VERSION == 2
    assert not (out / ifr.SUGGESTED_YAML).exists()


def _refused(run: Any, out: Path, *words: str) -> None:
    assert run.exit_code == 2, run.output
    assert run.output.count("\n") == 1 and run.output.startswith("error:"), run.output
    assert all(w in run.output for w in words), run.output
    assert not out.exists()


def test_bad_calibration_input_is_one_line_and_writes_nothing(demo: Path, tmp_path: Path) -> None:
    config = demo_config(tmp_path, demo, [(n, demo / "adapters" / n, n) for n in ("facts", "math")])
    out = tmp_path / "report"
    _refused(invoke(str(config), "--out", str(out), "--calibration-size", "0"), out, "--calibration-size")
    data = yaml.safe_load(config.read_text())
    missing = dict(data, adapters=[dict(data["adapters"][0], calibration=str(tmp_path / "nope.txt")),
                                   data["adapters"][1]])
    _refused(invoke(str(write_config(tmp_path, missing, "missing.yaml")), "--out", str(out)), out,
             "adapters[0]", "nope.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = dict(data, adapters=[data["adapters"][0], dict(data["adapters"][1], calibration=str(tmp_path / "empty.txt"))])
    _refused(invoke(str(write_config(tmp_path, empty, "empty.yaml")), "--out", str(out)), out,
             "adapters[1]", "empty.txt", "no prompts")
    partial = dict(data, adapters=[data["adapters"][0], {"path": data["adapters"][1]["path"]}])
    _refused(invoke(str(write_config(tmp_path, partial, "partial.yaml")), "--out", str(out)), out,
             "adapters[1]", "no calibration data")
    wrong = dict(data, adapters=[dict(data["adapters"][0], calibration=str(tmp_path / "prompts.csv")),
                                 data["adapters"][1]])
    _refused(invoke(str(write_config(tmp_path, wrong, "wrong.yaml")), "--out", str(out)), out,
             "adapters[0]", ".jsonl, .txt or .yaml")
    with pytest.raises(Exception, match="--calibration-size 0"):
        ifr.check_size(0)


def test_interference_keys_are_documented() -> None:
    docs = (REPO / "docs" / "INSPECT.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", docs))
    keys = {*report.INTERFERENCE_KEYS, *report.INTERFERENCE_CALIBRATION_KEYS, *report.INTERFERENCE_SETTINGS_KEYS,
            *report.SUGGESTED_KEYS}
    assert keys - documented == set()
    for finding in ("costly_adapter", "little_interference", "moderate_interference", "helping_adapter", "no_gain",
                    "suggested_weights"):
        assert finding in docs


# ------------------------------------------------------------------------------------------------------------
# the README's command on the suite
# ------------------------------------------------------------------------------------------------------------


def _readme_command() -> list[str]:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"`(merge inspect merge_configs/inspect_calibrated_suite\.yaml[^`]*)`", readme)
    assert match, "the README shows the calibrated inspect command"
    return match.group(1).split()[1:]


@pytest.mark.slow
def test_the_readme_command_runs_on_the_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _readme_command()
    out = tmp_path / "inspect_calibrated"
    args[args.index("--out") + 1] = str(out)
    monkeypatch.chdir(REPO)
    run = CliRunner().invoke(main, [*args, "--no-progress", "--no-plots"])
    assert run.exit_code == 0, run.output
    block = json.loads((out / "inspect.json").read_text())["interference"]
    assert block["adapters"] == ["capitals", "add", "reverse", "sentiment"]
    assert all(g > 0 for g in block["gain"])
    assert [c["source"].rsplit("/", 2)[-2:] for c in block["calibration"]][0] == ["capitals", "train.jsonl"]
    from mergekit_lite.config import load_config

    suggested = load_config(out / ifr.SUGGESTED_YAML)
    assert suggested.eval is not None and [a.label for a in suggested.adapters] == block["adapters"]
    # the committed report is this command's output: the same matrix and weights (same seed, same teachers)
    committed = json.loads((REPO / "evals/results/inspect_calibrated/inspect.json").read_text())["interference"]
    for key in ("cost", "cost_share", "pair_ll", "alone_ll"):
        for ours, theirs in zip(block[key], committed[key]):
            assert ours == pytest.approx(theirs, abs=1e-4)
    assert block["suggested"]["weights"] == committed["suggested"]["weights"]
    # the README's merge eval command names configs that load, the committed suggested_merge.yaml first
    readme = (REPO / "README.md").read_text()
    command = re.search(r"`merge eval (evals/results/inspect_calibrated/suggested_merge\.yaml[^`]*) --out (\S+)`", readme)
    assert command, "the README shows how the suggested weights were scored"
    configs = [load_config(REPO / path) for path in command.group(1).split()]
    assert configs[0].weights == list(committed["suggested"]["weights"].values())
