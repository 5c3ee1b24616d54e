"""merge sweep end to end on the suite's tiny base: the outputs, in-memory scores equal to `merge eval` of the
written checkpoint, the base restored byte for byte, disjoint validation and test documents, --resume (also
after a SIGKILL) re-evaluating nothing that finished, and a tampered cache entry evaluated again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")

from mergekit_lite import load_config, merge  # noqa: E402
from mergekit_lite.evaluation.harness import evaluate_lm, load_lm  # noqa: E402
from mergekit_lite.evaluation.options import EvalOptions  # noqa: E402
from mergekit_lite.evaluation.rows import ModelSpec  # noqa: E402
from mergekit_lite.evaluation.scores import extract_scores, table_columns  # noqa: E402
from mergekit_lite.evaluation.tasks import SUITE_DIR, suite_tasks_dir  # noqa: E402
from mergekit_lite.sweep import load_sweep_config, run_sweep  # noqa: E402
from mergekit_lite.sweep.run import CACHE_DIR, absolute_config, point_config  # noqa: E402

pytestmark = pytest.mark.slow

TASKS = ["add", "capitals"]


def _write_config(folder: Path, lambdas: list[float], **extra: Any) -> Path:
    data = {"base_model": str(SUITE_DIR / "base"),
            "adapters": [{"path": str(SUITE_DIR / "adapters" / name)} for name in TASKS],
            "sweep": {"method": ["ties"], "parameters": {"lambda": lambdas, "density": [0.5]}},
            "eval": {"tasks": TASKS, "limit": 12, "batch_size": 16}, **extra}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    folder = tmp_path_factory.mktemp("sweep")
    config = _write_config(folder, [0.5, 1.0], output={"path": str(folder / "best_out")})
    out = folder / "report"
    return run_sweep(load_sweep_config(config), out, progress=False, device="cpu"), out, config


def test_a_grid_writes_every_output_and_best_yaml_reproduces_the_chosen_merge(swept: tuple[Any, Path, Path]) -> None:
    result, out, _ = swept
    for name in ("leaderboard.md", "leaderboard.json", "leaderboard.csv", "best.yaml", "test.md", "test.json",
                 "figures/ties.png", "figures/test_comparison.png"):
        assert (out / name).is_file(), name
    board = json.loads((out / "leaderboard.json").read_text())
    assert [p["swept"]["lambda"] for p in board["points"]] == sorted([0.5, 1.0], key=lambda v: -next(
        r.summary["answer_ll_retention"] for r in result.rows if r.point.parameters["lambda"] == v))
    assert board["best"] == result.best.name and board["split"] == "validation"
    names = [row["name"] for row in json.loads((out / "test.json").read_text())["rows"]]
    assert names[:3] == ["base", "add", "capitals"] and names[3].startswith("chosen: ties")
    best = load_config(out / "best.yaml")
    assert best.global_params["lambda"] == result.best.point.parameters["lambda"]
    assert absolute_config(best) == absolute_config(point_config(result.config, result.best.point))
    written = Path(result.config.template().output_path)
    assert (written / "model.safetensors").is_file() and "## Sweep" in (written / "README.md").read_text()


def test_in_memory_scores_equal_merge_eval_of_the_written_checkpoint(swept: tuple[Any, Path, Path],
                                                                     tmp_path: Path) -> None:
    from mergekit_lite.evaluation.splits import validation_selection
    from mergekit_lite.evaluation.tasks import select_tasks

    result, out, _ = swept
    written = merge(load_config(out / "best.yaml"), out=tmp_path / "best", device="cpu", progress=False)
    selection = validation_selection(select_tasks(TASKS, suite_tasks_dir()))
    options = EvalOptions(limit=12, batch_size=16, device="cpu")
    lm = load_lm(ModelSpec("best", "merge", written.output_dir), options)  # merge eval's own loading path
    results = evaluate_lm(lm, selection, options)
    assert extract_scores(results, table_columns(results, selection.table_tasks)) == result.best.result["scores"]


def test_the_patched_model_is_restored_byte_for_byte(swept: tuple[Any, Path, Path]) -> None:
    from safetensors.torch import load_file

    from mergekit_lite.sweep.worker import MERGE, Job, Worker, WorkerSpec

    result, _, _ = swept
    worker = Worker(WorkerSpec(str(SUITE_DIR / "base"), None, TASKS, EvalOptions(limit=4, batch_size=16)))
    base = load_file(str(SUITE_DIR / "base" / "model.safetensors"))
    job = Job(MERGE, "p", "validation", absolute_config(point_config(result.config, result.best.point)))
    tensors = worker.merge(job)
    worker.patcher.apply(tensors)
    patched = worker.model.state_dict()
    assert any(not patched[name].equal(base[name]) for name in tensors)
    worker.patcher.restore()
    worker.evaluate(job)
    state = worker.model.state_dict()
    for name, tensor in base.items():
        assert state[name].dtype == tensor.dtype and bytes(state[name].numpy().tobytes()) == bytes(tensor.numpy().tobytes())


def test_validation_and_test_use_disjoint_documents() -> None:
    from mergekit_lite.evaluation.splits import validation_selection
    from mergekit_lite.evaluation.tasks import select_tasks

    def rows(task: str, split: str) -> list[dict[str, Any]]:
        text = (SUITE_DIR / "data" / task / f"{split}.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    for task in ("add", "reverse", "sentiment"):
        seen = {r["question"] for split in ("train", "test") for r in rows(task, split)}
        assert not seen & {r["question"] for r in rows(task, "validation")}, task
    # capitals is recall of the trained facts (its test asks every one): validation asks them with other choices
    test = {(r["question"], tuple(sorted(r["choices"]))) for r in rows("capitals", "test")}
    assert not test & {(r["question"], tuple(sorted(r["choices"]))) for r in rows("capitals", "validation")}
    selection = select_tasks(["add", "reverse"], suite_tasks_dir())
    validation = validation_selection(selection)
    for test_task, val_task in zip(selection.built, validation.built):
        assert test_task.task_name == val_task.task_name
        assert not {d["question"] for d in test_task.eval_docs} & {d["question"] for d in val_task.eval_docs}


def test_resume_reevaluates_nothing_and_a_tampered_entry_is_evaluated_again(swept: tuple[Any, Path, Path]) -> None:
    result, out, config = swept
    again = run_sweep(load_sweep_config(config), out, resume=True, overwrite=True, progress=False, device="cpu")
    assert again.evaluated == 0 and again.reused == result.evaluated
    assert [r.summary for r in again.rows] == [r.summary for r in result.rows]
    entry = sorted((out / CACHE_DIR).glob("*.json"))[0]
    data = json.loads(entry.read_text())
    data["result"]["scores"] = {task: {**v, "acc": 1.0} for task, v in data["result"]["scores"].items()}
    entry.write_text(json.dumps(data))
    third = run_sweep(load_sweep_config(config), out, resume=True, overwrite=True, progress=False, device="cpu")
    assert third.evaluated == 1 and third.rejected == 1
    assert [r.summary for r in third.rows] == [r.summary for r in result.rows]


def test_a_sweep_killed_mid_way_resumes_with_the_rest_only(tmp_path: Path) -> None:
    config = _write_config(tmp_path, [0.25, 0.5, 0.75, 1.0, 1.25])
    out = tmp_path / "report"
    command = [sys.executable, "-m", "mergekit_lite.cli", "sweep", str(config), "--out", str(out), "--no-progress",
               "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    references = 1 + len(TASKS)
    deadline = time.monotonic() + 120
    while len(list((out / CACHE_DIR).glob("*.json"))) < references + 2:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((out / CACHE_DIR).glob("*.json")))
    assert references + 2 <= finished < references + 5
    result = run_sweep(load_sweep_config(config), out, resume=True, progress=False, device="cpu")
    assert result.reused == finished
    assert result.evaluated == (references + 5) - finished + len(result.test_rows)
    assert len(result.rows) == 5 and all(r.error is None for r in result.rows)


def test_sigterm_mid_sweep_says_the_finished_points_are_kept_and_they_are(tmp_path: Path) -> None:
    """#23: SIGTERM used to say 'no partial output was left behind' while the cache kept the finished points."""
    config = _write_config(tmp_path, [0.25, 0.5, 0.75, 1.0])
    out = tmp_path / "report"
    command = [sys.executable, "-m", "mergekit_lite.cli", "sweep", str(config), "--out", str(out), "--no-progress",
               "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / CACHE_DIR).glob("*.json")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("terminated: finished points are kept in") and "--resume" in last, stderr
    assert "no partial output" not in stderr
    assert list((out / CACHE_DIR).glob("*.json")) and not (out / "leaderboard.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "sweep.yaml"]


def test_the_readme_sweep_reproduces_its_committed_results_from_their_cache(tmp_path: Path) -> None:
    """The README's `merge sweep` command, on copies (its results folder, the config with the output moved here):
    every point comes from the committed cache (keys hold file fingerprints, not paths) and the tables match."""
    import re
    import shutil

    from click.testing import CliRunner

    from mergekit_lite.cli import main

    repo = Path(__file__).resolve().parents[1]
    command = re.search(r"^merge sweep (\S+) --out (\S+)$", (repo / "README.md").read_text(), re.M)
    assert command, "README lost its merge sweep command"
    config_path, results = repo / command.group(1), repo / command.group(2)
    data = yaml.safe_load(config_path.read_text())
    data["base_model"] = str((config_path.parent / data["base_model"]).resolve())
    data["adapters"] = [{**a, "path": str((config_path.parent / a["path"]).resolve())} for a in data["adapters"]]
    data["output"] = {**data["output"], "path": str(tmp_path / "best")}
    copy = tmp_path / "sweep_suite.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "results"
    shutil.copytree(results, out)
    outcome = CliRunner().invoke(main, ["sweep", str(copy), "--out", str(out), "--resume", "--no-progress",
                                        "--device", "cpu"])
    assert outcome.exit_code == 0, outcome.output
    assert "evaluated 0" in outcome.output
    ours, committed = (json.loads((folder / "leaderboard.json").read_text()) for folder in (out, results))
    assert [(p["name"], p["summary"]) for p in ours["points"]] == [(p["name"], p["summary"]) for p in committed["points"]]
    assert (out / "test.md").read_text() == (results / "test.md").read_text()
    assert "## Sweep" in (tmp_path / "best" / "README.md").read_text()
