"""`merge eval` beyond the suite: lm-eval's built-in tasks by name, users' task files and folders as lm-eval loads
them (`!function`, `include:`, groups, `dataset_path: json`), generation tasks, lm-eval's options passed
through, lm-eval's own output format, and one-line errors (unknown names, uncached datasets offline) that
leave nothing written. Everything runs offline: built-in task *configs* are copied and pointed at local JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.config import MergeConfig
from mergekit_lite.errors import EvalError, MergeConfigError
from mergekit_lite.evaluation.options import EvalOptions, parse_batch_size, parse_limit
from mergekit_lite.evaluation.scores import (
    RetentionRef,
    compute_retention,
    headline_metric,
    reference_adapter,
    table_columns,
)
from mergekit_lite.evaluation.tasks import split_task_args

from .conftest import REPO

SUITE = REPO / "mergekit_lite" / "evaluation" / "suite"

ARC_ROWS = [
    {"id": f"q{i}", "question": q, "choices": {"text": list(c), "label": ["A", "B", "C", "D"]}, "answerKey": k}
    for i, (q, c, k) in enumerate([
        ("What is the capital of France?", ("Paris", "Rome", "Oslo", "Lima"), "A"),
        ("What is 2 + 3?", ("4", "5", "6", "7"), "B"),
        ("Which is a colour?", ("dog", "run", "blue", "fast"), "C"),
        ("Which one is a fruit?", ("car", "stone", "table", "apple"), "D"),
        ("What do bees make?", ("honey", "milk", "silk", "wool"), "A"),
        ("How many legs has a cat?", ("two", "four", "six", "eight"), "B"),
    ])
]
GSM_ROWS = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (2, 2), (7, 1)]]


@pytest.fixture(scope="module")
def lm_eval_tasks_dir() -> Path:
    lm_eval = pytest.importorskip("lm_eval")
    return Path(lm_eval.__file__).parent / "tasks"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _local_copy(builtin_yaml: Path, folder: Path, name: str, rows: list[dict[str, Any]],
                splits: tuple[str, ...]) -> Path:
    """A built-in task's YAML as it ships, renamed and pointed at local JSON files (`dataset_path: json`)."""
    config = yaml.safe_load(builtin_yaml.read_text())
    config.pop("tag", None)
    data = {split: _write_jsonl(folder / f"{name}_{split}.jsonl", rows) for split in splits}
    config.update(task=name, dataset_path="json", dataset_kwargs={"data_files": data})
    config.pop("dataset_name", None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _eval(*args: str) -> Any:
    return CliRunner().invoke(main, ["eval", str(SUITE / "base"), "--no-progress", *args])


def _errors(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_builtin_task_configs_pointed_at_local_json_run_end_to_end_with_their_metrics(
    lm_eval_tasks_dir: Path, tmp_path: Path
) -> None:
    """arc_easy's and gsm8k's own YAMLs (multiple choice; generate_until with filters and exact_match), in a
    folder of exactly those two tasks: the folder runs them and nothing else, gsm8k's headline is its
    strict-match exact_match, and lm-eval's options and output format come through."""
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    _local_copy(lm_eval_tasks_dir / "arc" / "arc_easy.yaml", tasks, "my_arc", ARC_ROWS, ("train", "validation", "test"))
    _local_copy(lm_eval_tasks_dir / "gsm8k" / "gsm8k.yaml", tasks, "my_gsm", GSM_ROWS, ("train", "test"))
    out = tmp_path / "report"
    result = _eval("--tasks", str(tasks), "--limit", "4", "--num-fewshot", "1", "--seed", "3",
                   "--gen-kwargs", "max_gen_toks=8", "--log-samples", "--batch-size", "auto", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "scores.json").read_text())
    assert data["tasks"] == ["my_arc", "my_gsm"]  # exactly the folder's tasks, never the suite
    assert data["task_files"] == [f"{tasks.resolve()}: my_arc, my_gsm"]
    assert data["headline_metrics"]["my_arc"]["metric"] == "acc"
    assert data["headline_metrics"]["my_gsm"] == {"key": "exact_match,strict-match", "metric": "exact_match",
                                                  "filter": "strict-match", "higher_is_better": True}
    assert set(data["scores"]["base"]) == {"my_arc", "my_gsm"}
    assert 0.0 <= data["scores"]["base"]["my_gsm"]["acc"] <= 1.0
    report = (out / "report.md").read_text()
    assert "1-shot" in report and "exact_match (strict-match filter)" in report
    # lm-eval's own format, written by its EvaluationTracker: results_<date>.json and samples per task.
    own = sorted((out / "lm_eval" / "base").iterdir())
    results_file = next(p for p in own if p.name.startswith("results_"))
    results = json.loads(results_file.read_text())
    assert results["config"]["limit"] == 4 and results["config"]["random_seed"] == 3
    assert results["config"]["gen_kwargs"] == {"max_gen_toks": 8}
    assert results["n-shot"]["my_arc"] == 1
    samples = [p.name for p in own if p.name.startswith("samples_")]
    assert sorted(name.split("_2")[0] for name in samples) == ["samples_my_arc", "samples_my_gsm"]


@pytest.mark.slow
def test_a_task_file_with_function_tags_includes_and_a_group_runs_as_lm_eval_loads_it(tmp_path: Path) -> None:
    """`!function` (process_docs), `include:` of a template, and a group whose members the table shows when
    the group has no aggregate; a single file names only its own task."""
    tasks = tmp_path / "custom"
    tasks.mkdir()
    data = _write_jsonl(tasks / "data.jsonl", [{"q": f"{a} plus {b}", "a": str(a + b)} for a, b in
                                               [(1, 1), (2, 3), (4, 4), (1, 5), (2, 7), (3, 3)]])
    (tasks / "helpers.py").write_text(
        "def shout(dataset):\n"
        "    return dataset.map(lambda doc: {'q': doc['q'].upper(), 'a': doc['a']})\n"
    )
    (tasks / "_base_template").write_text(yaml.safe_dump({
        "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "{{[a, '0']}}",
        "doc_to_target": 0, "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    (tasks / "plain.yaml").write_text("include: _base_template\ntask: plain_sum\n")
    (tasks / "loud.yaml").write_text("include: _base_template\ntask: loud_sum\nprocess_docs: !function helpers.shout\n")
    (tasks / "group.yaml").write_text("group: sums\ntask:\n  - plain_sum\n  - loud_sum\n")

    out = tmp_path / "one"
    result = _eval("--tasks", str(tasks / "loud.yaml"), "--limit", "3", "--out", str(out), "--log-samples")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scores.json").read_text())["tasks"] == ["loud_sum"]
    samples = next(p for p in (out / "lm_eval" / "base").iterdir() if p.name.startswith("samples_loud_sum"))
    assert json.loads(samples.read_text().splitlines()[0])["doc"]["q"] == "1 PLUS 1"  # !function ran

    out = tmp_path / "folder"
    result = _eval("--tasks", str(tasks), "--limit", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "scores.json").read_text())
    assert data["tasks"] == ["plain_sum", "loud_sum"]  # the group, shown by its members (no aggregate)
    assert data["task_files"] == [f"{tasks.resolve()}: sums"]
    raw = json.loads((out / "results" / "base.json").read_text())
    assert {"plain_sum", "loud_sum"} <= set(raw["results"]) and raw["group_subtasks"]["sums"]


@pytest.mark.slow
def test_a_builtin_task_name_resolves_through_lm_evals_own_index_and_unknown_names_get_suggestions(
    tmp_path: Path,
) -> None:
    pytest.importorskip("lm_eval")
    from mergekit_lite.evaluation.tasks import select_tasks, suite_tasks_dir

    notes: list[str] = []
    selection = select_tasks(["arc_easy", "mmlu", "capitals"], suite_tasks_dir(), build=False, note=notes.append)
    assert selection.builtin_index and len(notes) == 1 and "built-in" in notes[0]
    assert selection.table_tasks == ["arc_easy", "mmlu", "capitals"]
    assert selection.run_tasks == ["arc_easy", "mmlu", "capitals", "capitals_ll"]
    index = selection.manager.task_index
    assert index["arc_easy"].cfg["dataset_path"] == "allenai/ai2_arc" and str(index["mmlu"].kind) == "Kind.GROUP"
    with pytest.raises(EvalError, match=r"^unknown lm-eval task 'helaswag' \(did you mean 'hellaswag'"):
        select_tasks(["helaswag"], suite_tasks_dir(), build=False)
    result = _eval("--tasks", "arc_eazy", "--out", str(tmp_path / "r"))
    errors = _errors(result.output)
    assert result.exit_code == 2 and len(errors) == 1
    assert errors[0].startswith("error: unknown lm-eval task 'arc_eazy' (did you mean 'arc_easy'")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_an_uncached_builtin_dataset_offline_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    out = tmp_path / "report"
    result = _eval("--tasks", "arc_easy", "--limit", "5", "--out", str(out))
    assert result.exit_code == 2, result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and "'arc_easy' needs the dataset allenai/ai2_arc (ARC-Easy)" in errors[0]
    assert "load_dataset('allenai/ai2_arc', 'ARC-Easy')" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_a_merge_config_with_eval_options_checks_its_tasks_before_merging(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from .conftest import write_config

    config = write_config(tmp_path, {
        "base_model": str(SUITE / "base"), "method": "linear",
        "adapters": [{"path": str(SUITE / "adapters" / "add")}],
        "output": {"path": str(tmp_path / "merged")},
        "eval": {"tasks": ["ad"], "limit": 0.5, "num_fewshot": 0, "batch_size": "auto"},
    })
    result = CliRunner().invoke(main, ["eval", str(config), "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 2 and "unknown lm-eval task 'ad'" in result.output
    assert not (tmp_path / "merged").exists() and not (tmp_path / "r").exists()  # nothing merged, nothing written


# -------------------------------------------------------------------------------------- units (no lm-eval)


def test_limit_is_a_count_or_a_fraction_and_batch_size_may_be_auto() -> None:
    assert parse_limit("5") == 5 and isinstance(parse_limit("5"), int) and parse_limit(0.25) == 0.25
    assert parse_limit(3.0) == 3 and parse_limit("0.1") == 0.1
    for bad in ("0", "-1", "1.5", "many", None):
        with pytest.raises(ValueError, match="count"):
            parse_limit(bad)
    assert parse_batch_size("auto") == "auto" and parse_batch_size("auto:4") == "auto:4"
    assert parse_batch_size("16") == 16
    for bad in ("0", "big", "auto:x"):
        with pytest.raises(ValueError, match="batch_size"):
            parse_batch_size(bad)


def test_the_eval_section_takes_lm_evals_options_and_rejects_bad_values(tmp_path: Path) -> None:
    base = {"base_model": str(SUITE / "base"), "method": "linear", "adapters": [{"path": str(SUITE / "adapters" / "add")}],
            "output": {"path": str(tmp_path / "o")}}
    config = MergeConfig.from_dict({**base, "eval": {"limit": 0.5, "batch_size": "auto", "num_fewshot": 2,
                                                     "seed": 7, "gen_kwargs": "max_gen_toks=4", "log_samples": True}})
    options = EvalOptions.from_spec(config.eval, device="cpu", num_fewshot=3)
    assert options.limit == 0.5 and options.batch_size == "auto" and options.num_fewshot == 3 and options.seed == 7
    kwargs = options.simple_evaluate_kwargs()
    assert kwargs["fewshot_random_seed"] == kwargs["random_seed"] == 7 and kwargs["gen_kwargs"] == "max_gen_toks=4"
    for bad in ({"limit": 0}, {"batch_size": "huge"}, {"num_fewshot": -1}, {"limt": 3}):
        with pytest.raises(MergeConfigError):
            MergeConfig.from_dict({**base, "eval": bad})


def test_task_arguments_split_into_names_and_paths(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("task: t\n")
    names, paths = split_task_args(["arc_easy,mmlu", f"{tmp_path / 't.yaml'}", str(tmp_path)])
    assert names == ["arc_easy", "mmlu"] and paths == [(tmp_path / "t.yaml").resolve(), tmp_path.resolve()]
    with pytest.raises(EvalError, match="does not exist"):
        split_task_args([str(tmp_path / "missing.yaml")])


def _results(**tasks: dict[str, Any]) -> dict[str, Any]:
    return {"results": tasks, "higher_is_better": {t: {"word_perplexity": False} for t in tasks}}


def test_the_headline_metric_prefers_acc_then_exact_match_and_knows_its_direction() -> None:
    gsm = {"alias": "gsm8k", "exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": 0.1,
           "exact_match,flexible-extract": 0.3}
    arc = {"acc,none": 0.5, "acc_norm,none": 0.6, "acc_stderr,none": 0.1}
    wiki = {"word_perplexity,none": 30.0, "byte_perplexity,none": 1.8, "bits_per_byte,none": 0.9}
    results = _results(gsm8k=gsm, arc=arc, wiki=wiki)
    assert headline_metric(results, "gsm8k")["key"] == "exact_match,strict-match"
    assert headline_metric(results, "arc")["key"] == "acc,none"
    wiki_headline = headline_metric(results, "wiki")
    assert wiki_headline["key"] == "word_perplexity,none" and wiki_headline["higher_is_better"] is False


def test_retention_and_the_reference_adapter_respect_lower_is_better() -> None:
    scores = {"base": {"wiki": {"acc": 30.0}}, "a": {"wiki": {"acc": 20.0}}, "b": {"wiki": {"acc": 25.0}},
              "merged": {"wiki": {"acc": 25.0}}}
    ref = RetentionRef("base", ("a", "b"))
    assert reference_adapter(scores, ref, "wiki", "acc", higher_is_better=False) == "a"
    assert reference_adapter(scores, ref, "wiki", "acc") == "b"
    kept = compute_retention(scores, ["wiki"], ["acc"], {"merged": ref}, {"wiki": {"higher_is_better": False}})
    assert kept["merged"]["acc"]["wiki"] == pytest.approx(0.5)  # half of the 10-point perplexity drop


def test_table_columns_show_a_group_with_an_aggregate_and_the_members_of_one_without() -> None:
    results = {"results": {"mmlu": {"acc,none": 0.3}, "m1": {"acc,none": 0.2}, "sums": {"alias": "sums"},
                           "s1": {"acc,none": 1.0}, "s2": {"acc,none": 0.0}, "capitals": {"acc,none": 1.0},
                           "capitals_ll": {"perplexity,none": 2.0}},
               "group_subtasks": {"mmlu": ["m1"], "sums": ["s1", "s2"]}}
    assert table_columns(results, ["mmlu", "sums", "capitals", "capitals_ll"]) == ["mmlu", "s1", "s2", "capitals"]
