"""merge sweep never writes into, over or beside what it did not create (#23), and knows before any model loads
what would fail later: the output folders, non-finite values, densities a method refuses, the point count, a
`models:` sweep's metric; a cache entry of the wrong shape is evaluated again; the report set survives SIGKILL
at any moment as the old set or the new one."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.evaluation.options import EvalOptions
from mergekit_lite.evaluation.tasks import SUITE_DIR
from mergekit_lite.sweep import report as sweep_report
from mergekit_lite.sweep.cache import FORMAT, ResultCache, digest
from mergekit_lite.sweep.points import Point, point_count
from mergekit_lite.sweep.run import CACHE_DIR, Row, SweepResult
from mergekit_lite.sweep.spec import MODELS_DEFAULT_METRIC, sweep_config_from_dict
from mergekit_lite.writers.ownership import MARKER, read_marker, write_marker

from .refusals import one_line as _refused

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ("capitals", "add")


def _data(sweep: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"base_model": str(SUITE_DIR / "base"),
            "adapters": [{"path": str(SUITE_DIR / "adapters" / name)} for name in ADAPTERS],
            "sweep": sweep or {"method": ["ties"], "parameters": {"lambda": [0.5, 1.0]}},
            "eval": {"tasks": list(ADAPTERS), "limit": 4}, **extra}


def _write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _sweep(config: Path, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["sweep", str(config), "--out", str(out), "--no-progress", "--device", "cpu",
                                     *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- the folders


@pytest.mark.parametrize("where", ["equal", "inside", "holds"])
def test_out_overlapping_the_configs_output_is_refused_before_any_work(tmp_path: Path, where: str) -> None:
    best = tmp_path / "best"
    config = _write(tmp_path, _data(output={"path": str(best)}))
    out = {"equal": best, "inside": best / "report", "holds": tmp_path}[where]
    _refused(_sweep(config, out), "overlap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_a_non_empty_out_that_is_not_a_sweeps_is_left_alone(tmp_path: Path) -> None:
    config = _write(tmp_path, _data())
    out = tmp_path / "mine"
    out.mkdir()
    (out / "leaderboard.md").write_text("my own leaderboard")
    (out / "report.md").write_text("my report")
    before = _tree(out)
    _refused(_sweep(config, out), "not empty", "merge sweep")
    assert _tree(out) == before


def test_out_in_an_input_folder_is_refused(tmp_path: Path) -> None:
    config = _write(tmp_path, _data())
    adapter = SUITE_DIR / "adapters" / "add"
    before = _tree(adapter)
    for out in (adapter, adapter / "report"):
        _refused(_sweep(config, out), "adapter 'add'")
    assert _tree(adapter) == before


def test_resume_does_not_replace_an_existing_output_without_overwrite(tmp_path: Path) -> None:
    best = tmp_path / "best"
    best.mkdir()
    (best / "notes.txt").write_text("keep me")
    config = _write(tmp_path, _data(output={"path": str(best)}))
    _refused(_sweep(config, tmp_path / "out", "--resume"), "already exists", "--overwrite")
    # --overwrite replaces only a merge output: a user's folder is refused even then
    _refused(_sweep(config, tmp_path / "out", "--resume", "--overwrite"), "not a merge output")
    assert _tree(best) == {"notes.txt": b"keep me"} and not (tmp_path / "out").exists()


def test_an_output_inside_an_input_is_refused_before_any_work(tmp_path: Path) -> None:
    config = _write(tmp_path, _data(output={"path": str(SUITE_DIR / "adapters" / "add" / "merged")}))
    _refused(_sweep(config, tmp_path / "out"), "adapter 'add'")
    assert not (SUITE_DIR / "adapters" / "add" / "merged").exists() and not (tmp_path / "out").exists()


def test_an_unwritable_out_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_lite.writers import ownership

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ownership.tempfile, "mkdtemp", refuse)
    config = _write(tmp_path, _data())
    _refused(_sweep(config, tmp_path / "out"), "cannot be written")


def test_the_best_merge_honours_the_users_overwrite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """sweep/report.py used to write the best merge with overwrite=True whatever the user said."""
    import mergekit_lite.api as api

    seen: list[bool] = []

    class Stop(Exception):
        pass

    def fake_merge(config: Any, *, overwrite: bool = False, **kwargs: Any) -> Any:
        seen.append(overwrite)
        raise Stop()

    monkeypatch.setattr(api, "merge", fake_merge)
    result = _result(sweep_config_from_dict(_data(output={"path": str(tmp_path / "best")}), tmp_path), 0.5)
    for flag in (False, True):
        with pytest.raises(Stop):
            sweep_report.write_best_merge(result, flag)
    assert seen == [False, True]


# ------------------------------------------------------------------------------- checks before any model loads


@pytest.mark.parametrize("sweep, words", [
    ({"method": ["ties"], "search": "random", "trials": 2, "parameters": {"lambda": {"low": 0, "high": math.inf}}},
     "finite"),
    ({"method": ["ties"], "weights": {"add": [math.inf]}}, "not a finite number"),
    ({"method": ["ties"], "parameters": {"lambda": [math.nan]}}, "not a finite number"),
    ({"method": ["ties"], "search": "random", "trials": 2, "weights": {"add": {"low": -1e308, "high": 1e308}}},
     "difference is finite"),
])
def test_non_finite_values_and_ranges_are_refused(sweep: dict[str, Any], words: str) -> None:
    with pytest.raises(MergeConfigError) as caught:
        sweep_config_from_dict(_data(sweep), REPO)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_an_empty_task_list_is_refused_not_swept_over_the_whole_suite() -> None:
    data = _data()
    data["eval"] = {"tasks": []}
    with pytest.raises(MergeConfigError, match="eval.tasks: an empty list"):
        sweep_config_from_dict(data, REPO)


def test_a_density_the_method_refuses_fails_before_any_model_loads(tmp_path: Path) -> None:
    config = _write(tmp_path, _data({"method": ["ties"], "parameters": {"density": [0.00001, 0.5]}}))
    _refused(_sweep(config, tmp_path / "out"), "ties at density 1e-05", "keeps 0 of the")
    assert not (tmp_path / "out").exists()


def test_a_models_sweep_selects_by_a_score_and_refuses_a_named_retention() -> None:
    models = {"models": [{"path": str(SUITE_DIR / "base"), "name": "one"},
                         {"path": str(SUITE_DIR / "base"), "name": "two"}]}
    data = {**_data({"method": ["task_arithmetic"]}), **models}
    del data["adapters"]
    assert sweep_config_from_dict(data, REPO).spec.metric == MODELS_DEFAULT_METRIC
    data["sweep"] = {"method": ["task_arithmetic"], "select": {"metric": "acc_retention"}}
    with pytest.raises(MergeConfigError, match="select by a score such as 'acc'"):
        sweep_config_from_dict(data, REPO)


@pytest.mark.parametrize("sweep", [
    {"method": ["ties"], "search": "random", "trials": 1_000_000_000, "parameters": {"lambda": {"low": 0, "high": 1}}},
    {"method": ["ties"], "parameters": {"lambda": [i / 100 for i in range(1, 101)],
                                        "density": [i / 100 for i in range(1, 101)]},
     "weights": {"add": [i / 10 for i in range(100)]}},
])
def test_a_sweep_beyond_the_cap_is_refused_with_its_point_count(tmp_path: Path, sweep: dict[str, Any]) -> None:
    config = _write(tmp_path, _data(sweep))
    count = point_count(sweep_config_from_dict(_data(sweep), REPO).spec)
    assert count in (1_000_000_000, 100 * 100 * 100)
    _refused(_sweep(config, tmp_path / "out"), f"has {count} points", "--max-points")
    assert not (tmp_path / "out").exists()


def test_max_points_lowers_the_cap(tmp_path: Path) -> None:
    config = _write(tmp_path, _data())
    _refused(_sweep(config, tmp_path / "out", "--max-points", "1"), "has 2 points")


def test_a_cache_entry_with_a_valid_checksum_but_the_wrong_shape_is_evaluated_again(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path)
    identity = {"job": "x"}
    key = digest(identity)
    for bad in ([1, 2], {"scores": [1]}, {"scores": {"add": 3}}, {"scores": {"add": {"acc": "high"}}},
                {"merge_s": 1}, {"scores": {"add": {"acc": 0.5}}, "eval_s": "slow"}):
        body = {"format": FORMAT, "key": key, "identity": identity, "result": bad}
        cache.path(key).write_text(json.dumps({**body, "checksum": digest(body)}))
        assert cache.get(key) is None, bad
    good = {"scores": {"add": {"acc": 0.5, "answer_ll": -1.0, "exact": None}}, "merge_s": 0.1, "eval_s": 0.2}
    cache.put(key, identity, good)
    assert cache.get(key) == good


@pytest.mark.slow
def test_a_sweep_that_fails_before_any_result_leaves_out_as_it_was(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    from mergekit_lite.sweep import load_sweep_config, run as sweep_run

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise MergeConfigError("the backend failed")

    monkeypatch.setattr(sweep_run, "_run", fails)
    config = load_sweep_config(_write(tmp_path, _data()))
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        with pytest.raises(MergeConfigError, match="backend failed"):
            sweep_run.run_sweep(config, out, progress=False, device="cpu")
    assert not (tmp_path / "new").exists() and not any(empty.iterdir())


def test_sigterm_says_that_finished_points_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_lite import sweep
    from mergekit_lite.cli.errors import Terminated

    out = tmp_path / "out"

    def stopped(*args: Any, **kwargs: Any) -> Any:
        (out / CACHE_DIR).mkdir(parents=True)
        raise Terminated()

    monkeypatch.setattr(sweep, "run_sweep", stopped)
    result = _sweep(_write(tmp_path, _data()), out)
    assert result.exit_code == 143
    assert "finished points are kept" in result.output and "no partial output" not in result.output


# --------------------------------------------------------------------------------- the report set, atomically


def _result(config: Any, lam: float) -> SweepResult:
    """A finished sweep's result without evaluating anything: two points, scores made up from `lam`."""
    tasks = list(ADAPTERS)

    def scored(value: float) -> dict[str, Any]:
        return {"scores": {t: {"acc": value, "answer_ll": -value, "exact": value} for t in tasks},
                "merge_s": 0.1, "eval_s": 0.2}

    def summary(value: float) -> dict[str, Any]:
        return {"acc": value, "answer_ll": -value, "exact": value, "answer_ll_retention": value,
                "acc_retention": value, **{f"{t}:acc": value for t in tasks}}

    rows = [Row(f"ties lambda={v}", "merge", Point("ties", {"lambda": v}), scored(lam * v), False, summary(lam * v))
            for v in (0.5, 1.0)]
    references = {"validation": {"base": Row("base", "base", None, scored(0.1), False)}}
    test_rows = [Row("base", "base", None, scored(0.1), False),
                 Row("chosen: x", "merge", rows[1].point, scored(lam), False, summary(lam))]
    return SweepResult(config, tasks, EvalOptions(limit=4), rows, references, rows[1], test_rows, 2, 0)


def _write_report(result: SweepResult, out: Path) -> None:
    sweep_report.write_outputs(result, out)


@pytest.mark.slow
def test_sigkill_while_writing_the_report_leaves_the_old_set_or_the_new_set(tmp_path: Path) -> None:
    config = sweep_config_from_dict(_data(), tmp_path)
    out = tmp_path / "out"
    old, new = _result(config, 0.25), _result(config, 0.75)
    started = time.perf_counter()
    sweep_report.write_outputs(new, out)  # the new set as it lands at out (best.yaml's paths are relative to it)
    took = time.perf_counter() - started
    new_set = {**_tree(out), f"{CACHE_DIR}/entry.json": b"{}"}
    sweep_report.write_outputs(old, out)
    (out / CACHE_DIR).mkdir()
    (out / CACHE_DIR / "entry.json").write_text("{}")
    old_set = _tree(out)
    assert old_set != new_set
    context = multiprocessing.get_context("fork")
    seen = set()
    rng = random.Random(0)
    for attempt in range(12):
        child = context.Process(target=_write_report, args=(new, out))
        child.start()
        time.sleep(rng.uniform(0, took * 1.2))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        now = _tree(out)
        assert now in (old_set, new_set), attempt
        assert read_marker(out) == "sweep"
        seen.add("new" if now == new_set else "old")
        if now == new_set:  # start the next try from the old set again
            sweep_report.write_outputs(old, out)
    sweep_report.write_outputs(new, out)  # a later run cleans what killed ones left beside the folder
    assert _tree(out) == new_set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "old" in seen


def test_best_yaml_without_output_merges_beside_the_report_never_into_it(tmp_path: Path) -> None:
    """The report folder is replaced whole by the next sweep: `merge run best.yaml` must not write into it."""
    config = sweep_config_from_dict(_data(), tmp_path)
    out = tmp_path / "report"
    data = sweep_report.best_config_data(_result(config, 0.5), out)
    assert (out / data["output"]["path"]).resolve() == tmp_path / "report_best_merge"


def test_the_report_folder_is_marked_ours_and_a_users_file_added_later_blocks_the_swap(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    config = sweep_config_from_dict(_data(), tmp_path)
    out = tmp_path / "out"
    sweep_report.write_outputs(_result(config, 0.5), out)
    assert read_marker(out) == "sweep" and (out / MARKER).is_file()
    assert {"leaderboard.md", "leaderboard.json", "leaderboard.csv", "best.yaml", "test.md", "test.json"} <= {
        p.name for p in out.iterdir()}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "leaderboard.md").write_text("mine")
    write_marker(foreign, "eval")  # another command's folder is not a sweep's
    from mergekit_lite.errors import OutputPathError

    with pytest.raises(OutputPathError):
        sweep_report.write_outputs(_result(config, 0.5), foreign)
    assert (foreign / "leaderboard.md").read_text() == "mine"
