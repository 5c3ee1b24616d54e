"""`merge eval` on the offline suite (mergekit_lite/evaluation/suite): adapters learn their tasks, a linear merge
keeps part of each, the report agrees with lm-eval's own JSON, PEFT and our merge agree on every per-sample
log-likelihood (to 1e-4), and nothing reaches for the network. lm-eval runs are capped with --limit to keep the
module well under 90 s; they are all marked slow."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.evaluation.harness import offline
from mergekit_lite.evaluation.lm_eval_runner import run_lm_eval
from mergekit_lite.evaluation.options import EvalOptions
from mergekit_lite.evaluation.rows import ModelSpec
from mergekit_lite.evaluation.scores import retention_value
from mergekit_lite.evaluation.tasks import LL_SUFFIX, SUITE_TASKS, select_tasks, suite_tasks_dir

from .conftest import REPO, write_config

SUITE = REPO / "mergekit_lite" / "evaluation" / "suite"
LIMIT = 40  # examples per task in the end-to-end run (capitals has 48, the others 150)


def _suite_config(folder: Path, method: str, adapters: tuple[str, ...] = SUITE_TASKS, **extra: Any) -> Path:
    """A config over the committed suite (absolute paths), float32 output into `folder`."""
    data: dict[str, Any] = {
        "base_model": str(SUITE / "base"),
        "method": method,
        "adapters": [{"path": str(SUITE / "adapters" / name)} for name in adapters],
        "output": {"path": str(folder / method), "dtype": "float32"},
        "seed": 0,
        **extra,
    }
    return write_config(folder, data, name=f"{method}.yaml")


@pytest.fixture(scope="module")
def lm_eval_ready() -> Iterator[None]:
    """lm-eval installed (else skip: the `eval` extra is optional), the suite present, and one torch thread (tiny
    models; shared CI cores). The suite ships as package data: a missing one is a broken install, so it fails."""
    pytest.importorskip("lm_eval")
    if not (SUITE / "base" / "model.safetensors").is_file():
        pytest.fail(f"the eval suite is missing from {SUITE} (it ships with the package; rebuild: python evals/build_suite.py)")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def linear_report(lm_eval_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`merge eval` of a linear merge of all four adapters (merged first), run once for the module."""
    folder = tmp_path_factory.mktemp("eval_linear")
    config = _suite_config(folder, "linear")
    result = CliRunner().invoke(
        main, ["eval", str(config), "--limit", str(LIMIT), "--out", str(folder / "report"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (folder / "linear" / "model.safetensors").is_file()  # it merged first
    return folder / "report"


def _scores(report: Path) -> dict[str, dict[str, dict[str, float]]]:
    return json.loads((report / "scores.json").read_text())["scores"]


# ------------------------------------------------------------------------------------------- the claims


@pytest.mark.slow
def test_each_adapter_beats_the_base_on_its_own_task_by_a_wide_margin(linear_report: Path) -> None:
    scores = _scores(linear_report)
    for task in SUITE_TASKS:
        base, adapter = scores["base"][task], scores[task][task]
        assert adapter["acc"] >= 0.9, (task, adapter)
        assert adapter["acc"] >= base["acc"] + 0.4, (task, base, adapter)
        assert adapter["answer_ll"] >= base["answer_ll"] + 3.0, (task, base, adapter)  # nats per answer


@pytest.mark.slow
def test_linear_merge_of_all_adapters_scores_above_the_base_on_every_task(linear_report: Path) -> None:
    # The score is the answer's log-likelihood (evals/README.md, results: on a tiny base, a 4-way average keeps
    # part of each adapter's gain there while exact-choice accuracy of the most computed skill, `add`, stays at the
    # base's).
    scores = _scores(linear_report)
    for task in SUITE_TASKS:
        base, merged, adapter = scores["base"][task], scores["linear"][task], scores[task][task]
        assert merged["answer_ll"] >= base["answer_ll"] + 1.0, (task, base, merged)
        assert merged["answer_ll"] < adapter["answer_ll"], (task, merged, adapter)  # an average, not a specialist
    mean_acc = {name: sum(scores[name][t]["acc"] for t in SUITE_TASKS) / len(SUITE_TASKS) for name in ("base", "linear")}
    assert mean_acc["linear"] > mean_acc["base"], mean_acc


@pytest.mark.slow
def test_report_files_exist_and_the_tables_equal_lm_evals_json(linear_report: Path) -> None:
    names = ["base", *SUITE_TASKS, "linear"]
    results = {}
    for name in names:
        path = linear_report / "results" / f"{name}.json"
        assert path.is_file(), path
        results[name] = json.loads(path.read_text())["results"]
    chart = (linear_report / "chart.png").read_bytes()
    assert chart.startswith(b"\x89PNG\r\n\x1a\n") and len(chart) > 5000

    def from_json(name: str, task: str, metric: str) -> float:
        if metric == "acc":
            return results[name][task]["acc,none"]
        return -math.log(results[name][task + LL_SUFFIX]["perplexity,none"])

    scores = _scores(linear_report)
    tables = _tables((linear_report / "report.md").read_text())
    assert set(tables) == {"acc", "answer_ll"}
    for metric, rows in tables.items():
        assert [row["model"] for row in rows] == names
        for row in rows:
            values = [from_json(row["model"], task, metric) for task in SUITE_TASKS]
            for task, value in zip(SUITE_TASKS, values):
                assert row[task] == f"{value:.3f}", (metric, row["model"], task)
                assert scores[row["model"]][task][metric] == pytest.approx(value, abs=1e-12)
            assert row["average"] == f"{sum(values) / len(values):.3f}"
        merged = rows[-1]
        kept = []
        for task in SUITE_TASKS:
            value = retention_value(from_json("linear", task, metric), from_json("base", task, metric),
                                    from_json(task, task, metric))
            assert value is not None
            kept.append(value)
            assert merged[f"{task} ret."] == f"{value:.2f}", (metric, task)
        assert merged["mean ret."] == f"{sum(kept) / len(kept):.2f}"
        assert all(row[f"{SUITE_TASKS[0]} ret."] == "" for row in rows[:-1])  # only merges have retention


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """The report's tables by metric ('## Accuracy' → acc, '## Answer log-likelihood' → answer_ll)."""
    keys = {"Accuracy": "acc", "Answer log-likelihood": "answer_ll"}
    out: dict[str, list[dict[str, str]]] = {}
    for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", markdown, flags=re.MULTILINE | re.DOTALL):
        lines = [line for line in body.splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        out[keys[title.strip()]] = [
            dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]
        ]
    return out


@pytest.mark.slow
def test_peft_adapter_and_our_single_adapter_merge_agree_on_every_per_sample_loglikelihood(
    lm_eval_ready: None, tmp_path: Path
) -> None:
    from mergekit_lite import load_config, merge

    result = merge(load_config(_suite_config(tmp_path, "linear", adapters=("reverse",))), device="cpu",
                   progress=False)
    tasks = ["reverse", "reverse" + LL_SUFFIX, "capitals"]
    selection = select_tasks(["reverse", "capitals"], suite_tasks_dir())
    assert selection.run_tasks == ["reverse", "reverse" + LL_SUFFIX, "capitals", "capitals" + LL_SUFFIX]
    options = EvalOptions(limit=12, log_samples=True)
    peft = run_lm_eval(ModelSpec("peft", "adapter", SUITE / "base", SUITE / "adapters" / "reverse"), selection,
                       options)
    merged = run_lm_eval(ModelSpec("merged", "merge", result.output_dir), selection, options)
    compared = 0
    for task in tasks:
        assert len(peft["samples"][task]) == len(merged["samples"][task]) == 12
        for a, b in zip(peft["samples"][task], merged["samples"][task]):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            for (ll_a, _), (ll_b, _) in zip(a["filtered_resps"], b["filtered_resps"]):
                assert abs(ll_a - ll_b) <= 1e-4, (task, a["doc_id"], ll_a, ll_b)
                compared += 1
    assert compared == 12 * 4 + 12 + 12 * 4
    assert peft["results"]["reverse"]["acc,none"] == merged["results"]["reverse"]["acc,none"]


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.slow
def test_merge_run_with_an_eval_section_puts_the_table_in_the_model_card(lm_eval_ready: None, tmp_path: Path) -> None:
    config = _suite_config(tmp_path, "linear", adapters=("sentiment",),
                           eval={"tasks": ["sentiment"], "limit": 8, "batch_size": 8})
    result = CliRunner().invoke(main, ["run", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "linear"
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "| sentiment | adapter |" in card and "sentiment ret." in card
    assert card.index("## Evaluation") < card.index("## Reproduce")
    assert card.count("## Evaluation") == 1 and card.count("## Scores") == 1
    for name in ("report.md", "scores.json", "chart.png", "results/base.json", "results/sentiment.json",
                 "results/linear.json"):
        assert (out / "eval" / name).is_file(), name
    assert "| linear | merge |" in result.output  # the table is echoed too


@pytest.mark.slow
def test_merge_eval_scores_model_folders_as_they_are(lm_eval_ready: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", str(SUITE / "base"), "--tasks", "add", "--limit", "5",
                                       "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "scores.json").read_text())
    assert data["tasks"] == ["add"] and [m["name"] for m in data["models"]] == ["base"]
    assert data["retention"] == {} and "ret." not in (tmp_path / "r" / "report.md").read_text()
    assert set(data["scores"]["base"]["add"]) == {"acc", "answer_ll", "exact"}


@pytest.mark.slow
def test_an_earlier_eval_report_is_replaced_whole_and_marked(lm_eval_ready: None, tmp_path: Path) -> None:
    """#23: the report folder carries merge eval's marker and is staged and swapped whole, so a later run
    replaces it and nothing is left beside it; a file the user put into it since is theirs: the rerun refuses
    in one line and keeps it."""
    from mergekit_lite.writers.ownership import MARKER, read_marker

    out = tmp_path / "r"
    args = ["eval", str(SUITE / "base"), "--tasks", "add", "--limit", "3", "--out", str(out), "--no-progress"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert read_marker(out) == "eval" and (out / MARKER).is_file() and (out / "report.md").is_file()
    before = (out / "scores.json").read_bytes()
    (out / "stale.txt").write_text("the user's own notes")
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert [line for line in refused.output.splitlines() if line.strip()] == [refused.output.strip()]
    assert "stale.txt" in refused.output
    assert (out / "stale.txt").read_text() == "the user's own notes" and (out / "scores.json").read_bytes() == before
    (out / "stale.txt").unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "scores.json").is_file() and read_marker(out) == "eval"
    assert str(out / "report.md") in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.mark.slow
def test_an_unknown_task_is_one_line_with_a_suggestion(lm_eval_ready: None, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", str(SUITE / "base"), "--tasks", "capitels", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    error = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: unknown lm-eval task 'capitels' (did you mean 'capitals'")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_suite_task_yamls_load_from_any_working_directory(lm_eval_ready: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval.tasks

    monkeypatch.chdir(tmp_path)
    with offline():
        manager = select_tasks(None, suite_tasks_dir(), build=False).manager
        assert {*SUITE_TASKS, *(t + LL_SUFFIX for t in SUITE_TASKS)} <= set(manager.all_tasks)
        tasks = lm_eval.tasks.get_task_dict(["sentiment", "capitals" + LL_SUFFIX], manager)
    docs = list(tasks["sentiment"].test_docs())
    assert len(docs) == 150 and docs[0]["choices"] == ["good", "poor"]
    assert len(list(tasks["capitals" + LL_SUFFIX].test_docs())) == 48


# ------------------------------------------------------------------------------------ no lm-eval needed


def test_a_missing_target_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "nowhere.yaml")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nowhere.yaml'}: no such config file or model folder"


def test_an_output_made_from_another_config_is_not_evaluated_as_this_merge(tmp_path: Path) -> None:
    config = _suite_config(tmp_path, "linear")
    (tmp_path / "linear").mkdir()
    (tmp_path / "linear" / "mergekit_lite_config.yaml").write_text(yaml.safe_dump({"method": "ties"}))
    result = CliRunner().invoke(main, ["eval", str(config), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "exists but was not made from this config: pass --remerge" in result.output


def test_without_lm_eval_merge_eval_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail, installed or not
    result = CliRunner().invoke(main, ["eval", str(SUITE / "base"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.startswith("error: lm-eval is not installed") and "mergekit_lite[eval]" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_retention_is_the_fraction_of_the_adapters_gain_the_merge_keeps() -> None:
    assert retention_value(0.5, 0.25, 1.0) == pytest.approx(1 / 3)
    assert retention_value(-10.0, -20.0, -5.0) == pytest.approx(10 / 15)  # log-likelihoods: same formula
    assert retention_value(0.1, 0.25, 1.0) == pytest.approx(-0.2)  # worse than the base
    assert retention_value(0.5, 0.3, 0.3) is None  # the adapter gained nothing: nothing to retain


def test_offline_switches_are_on_inside_and_restored_after(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with offline():
        assert constants.HF_HUB_OFFLINE is True
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.slow
def test_importing_the_package_and_cli_does_not_import_lm_eval() -> None:
    code = ("import sys, mergekit_lite, mergekit_lite.cli, mergekit_lite.evaluation.lm_eval_runner, "
            "mergekit_lite.evaluation.after_merge; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'datasets', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_suite_task_folder_is_the_packages() -> None:
    assert suite_tasks_dir() == (SUITE / "tasks").resolve()
    for task in SUITE_TASKS:
        assert (SUITE / "tasks" / f"{task}.yaml").is_file()
        assert (SUITE / "data" / task / "test.jsonl").is_file()
        assert (SUITE / "data" / task / "train.jsonl").is_file()
