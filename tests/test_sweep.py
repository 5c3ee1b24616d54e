"""merge sweep, the fast part: the sweep config's checks (one-line errors before any work) and the points
(grid, seeded random draws and optuna's TPE: inside their ranges, the same for the same seed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main
from mergekit_lite.errors import MergeConfigError
from mergekit_lite.evaluation.tasks import SUITE_DIR
from mergekit_lite.sweep.points import Point, fixed_points, grid_points, point_stream
from mergekit_lite.sweep.spec import Range, check_metric, sweep_config_from_dict

REPO = Path(__file__).resolve().parents[1]


def _config(sweep: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"base_model": str(SUITE_DIR / "base"),
            "adapters": [{"path": str(SUITE_DIR / "adapters" / name)} for name in ("capitals", "add")],
            "sweep": sweep, **extra}


def _error(sweep: dict[str, Any], **extra: Any) -> str:
    with pytest.raises(MergeConfigError) as caught:
        sweep_config_from_dict(_config(sweep, **extra), REPO)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_grid_crosses_only_the_parameters_each_method_declares() -> None:
    config = sweep_config_from_dict(_config({"method": ["task_arithmetic", "ties"],
                                             "parameters": {"lambda": [0.5, 1.0], "density": [0.2, 0.5, 0.8]},
                                             "weights": {"add": [0.5, 1.5]}}), REPO)
    points = grid_points(config.spec)
    assert len([p for p in points if p.method == "task_arithmetic"]) == 2 * 2
    assert len([p for p in points if p.method == "ties"]) == 2 * 3 * 2
    assert all("density" not in p.parameters for p in points if p.method == "task_arithmetic")
    ties = next(p for p in points if p.method == "ties")
    merged = config.config_for(ties.method, ties.merge_parameters(), ties.weights)
    assert merged.weights == [1.0, ties.weights["add"]] and merged.global_params["density"] == ties.parameters["density"]


def test_a_methods_defaults_fill_a_required_density() -> None:
    assert Point("ties").merge_parameters() == {"density": 0.5}
    assert Point("task_arithmetic").merge_parameters() == {}


@pytest.mark.parametrize("sweep, words", [
    ({"method": ["task_arithmetic"], "parameters": {"density": [0.5]}}, "no chosen method (task_arithmetic) takes 'density'"),
    ({"method": ["ties"], "parameters": {"lambda": []}}, "empty list"),
    ({"method": []}, "empty list"),
    ({"method": ["ties"], "select": {"metric": "answer_ll_retension"}}, "did you mean 'answer_ll_retention'"),
    ({"method": ["ties"], "serch": "grid"}, "did you mean 'search'"),
    ({"method": ["tiez"]}, "did you mean 'ties'"),
    ({"method": ["ties"], "parameters": {"lambda": {"low": 0, "high": 1}}}, "needs search: random or optuna"),
    ({"method": ["ties"], "search": "random"}, "needs a number of trials"),
    ({"method": ["ties"], "weights": {"ad": [1.0]}}, "no adapter named 'ad' (did you mean 'add'?)"),
    ({"method": ["ties"], "parameters": {"density": [1.5]}}, "'density' must be in (0, 1]"),
    ({"method": ["ties"], "parameters": {"lambda": {"low": 1, "hgh": 2}}, "search": "random", "trials": 2},
     "did you mean 'high'"),
])
def test_bad_sweep_configs_are_one_line_errors(sweep: dict[str, Any], words: str) -> None:
    assert words in _error(sweep)


def test_method_and_parameters_belong_under_sweep() -> None:
    assert "'method' goes under 'sweep:'" in _error({"method": ["ties"]}, method="ties")


def test_a_task_metric_must_name_a_task_the_sweep_runs() -> None:
    check_metric("add:acc", ["add", "capitals"])
    with pytest.raises(MergeConfigError, match="names task 'ad'"):
        check_metric("ad:acc", ["add", "capitals"])


def test_the_cli_refuses_a_bad_sweep_in_one_line_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_config({"method": ["ties"], "parameters": {"alpha": [1.0]}})))
    result = CliRunner().invoke(main, ["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "no chosen method (ties) takes 'alpha'" in result.output
    assert not (tmp_path / "out").exists()


def _ranged(search: str, seed: int = 7) -> Any:
    return sweep_config_from_dict(_config({
        "method": ["ties", "task_arithmetic"], "search": search, "trials": 12, "seed": seed,
        "parameters": {"lambda": {"low": 0.2, "high": 1.5}, "density": [0.2, 0.5]},
        "weights": {"capitals": {"low": 0.0, "high": 2.0}, "add": [0.5, 1.0]}}), REPO).spec


def _inside(points: list[Point]) -> None:
    for point in points:
        assert 0.2 <= point.parameters["lambda"] <= 1.5
        assert point.parameters.get("density", 0.2) in (0.2, 0.5)
        assert 0.0 <= point.weights["capitals"] <= 2.0 and point.weights["add"] in (0.5, 1.0)


def test_random_points_are_inside_their_ranges_and_the_same_for_a_seed() -> None:
    first, again, other = fixed_points(_ranged("random")), fixed_points(_ranged("random")), fixed_points(_ranged("random", 8))
    assert first is not None and len(first) == 12
    assert first == again and first != other
    _inside(first)
    assert {p.method for p in first} == {"ties", "task_arithmetic"}


def test_optuna_points_are_inside_their_ranges_and_the_same_for_a_seed() -> None:
    pytest.importorskip("optuna")

    def score(point: Point) -> float:
        return point.parameters["lambda"] - abs(point.weights["capitals"] - 1.0)

    first = list(point_stream(_ranged("optuna"), score))
    again = list(point_stream(_ranged("optuna"), score))
    assert len(first) == 12 and first == again
    assert first != list(point_stream(_ranged("optuna", 8), score))
    _inside(first)
    assert isinstance(_ranged("optuna").parameters["lambda"], Range)


class _KeepOpen:
    """matplotlib.pyplot for a figure function, except that it leaves the figure open for the test to measure."""

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        self.plt, self.figures = plt, []

    def subplots(self, *args: Any, **kwargs: Any) -> Any:
        fig, axes = self.plt.subplots(*args, **kwargs)
        self.figures.append(fig)
        return fig, axes

    def close(self, fig: Any) -> None:
        pass


@pytest.mark.parametrize("count", [3, 5, 9])
def test_the_test_figure_never_prints_task_names_on_top_of_each_other(tmp_path: Path, count: int) -> None:
    from types import SimpleNamespace

    from mergekit_lite.sweep.report import _test_figure

    tasks = [f"mmlu_high_school_{name}" for name in ("macroeconomics", "world_history", "computer_science",
                                                    "government_and_politics", "european_history", "biology",
                                                    "chemistry", "mathematics", "statistics")[:count]]
    rows = [SimpleNamespace(kind="merge", name=name, summary={
        **{f"{t}:{m}": 0.5 for t in tasks for m in ("answer_ll_retention", "acc_retention")},
        "answer_ll_retention": 0.5, "acc_retention": 0.5}) for name in ("chosen ties", "ties default", "linear")]
    plt = _KeepOpen()
    _test_figure(SimpleNamespace(test_rows=rows, tasks=tasks), tmp_path / "test.png", plt)
    fig = plt.figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels() if label.get_text()]
        assert len(boxes) == count + 1  # the tasks and their mean
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        assert all(box.x0 >= 0 for box in boxes)  # inside the picture
    plt.plt.close(fig)


def _calibrated(names: tuple[str, ...] = ("capitals", "add"), split: str = "train") -> list[dict[str, Any]]:
    """Adapter entries carrying learned's calibration keys (each task's own train file, rendered as it renders)."""
    return [{"path": str(SUITE_DIR / "adapters" / name),
             "calibration": str(SUITE_DIR / "data" / name / f"{split}.jsonl"),
             "calibration_template": "Q: {{question}}\nA:", "calibration_size": 8} for name in names]


def test_a_mixed_sweep_gives_the_calibration_keys_only_to_the_calibrated_points() -> None:
    """#24: learned is one method among the others; its adapter keys and parameters reach only its own points."""
    from mergekit_lite.methods import get_method
    from mergekit_lite.sweep.result import point_config

    data = _config({"method": ["task_arithmetic", "ties", "learned"],
                    "parameters": {"lambda": [0.5, 1.0], "density": [0.5], "steps": [0, 2], "calibration_size": [4]},
                    "weights": {"add": [1.0, 0.5]}}, eval={"tasks": ["capitals", "add"]})
    data["adapters"] = _calibrated()
    sweep = sweep_config_from_dict(data, REPO)
    points = grid_points(sweep.spec)
    assert [sum(p.method == m for p in points) for m in sweep.spec.methods] == [2 * 2, 2 * 2, 2 * 2]
    for point in points:
        config = point_config(sweep, point)
        calibrated = get_method(point.method).calibrated is not None
        assert (point.method == "learned") == calibrated
        for params in config.adapter_params:
            assert ({"calibration", "calibration_template"} <= set(params)) == calibrated, point.label
            assert ("calibration_size" in params) == calibrated
        assert config.weights == [1.0, point.weights["add"]]
        if calibrated:
            assert [p["calibration_size"] for p in config.adapter_params] == [8, 8]  # the entry's own value wins
            assert config.global_params["steps"] == point.parameters["steps"] and "lambda" not in point.parameters
        else:
            assert "steps" not in config.global_params and "calibration_size" not in config.global_params
            assert config.global_params["lambda"] == point.parameters["lambda"]


def test_an_adapter_key_of_one_method_applies_only_to_that_methods_points() -> None:
    data = _config({"method": ["task_arithmetic", "ties"], "parameters": {"lambda": [1.0]}})
    data["adapters"][0]["density"] = 0.3
    sweep = sweep_config_from_dict(data, REPO)
    configs = {p.method: sweep.config_for(p.method, p.merge_parameters(), p.weights) for p in grid_points(sweep.spec)}
    assert [p["density"] for p in configs["ties"].adapter_params] == [0.3, 0.5]
    assert all("density" not in p for p in configs["task_arithmetic"].adapter_params)


@pytest.mark.parametrize("methods, split, words", [
    (["task_arithmetic", "ties"], "train", "unknown key 'calibration' for method 'task_arithmetic'"),
    (["task_arithmetic", "learned"], "validation", "is also the data the sweep scores"),
    (["ties", "learned"], "test", "is also the data the sweep scores"),
])
def test_calibration_keys_need_a_calibrated_method_and_never_read_what_the_sweep_scores(
        methods: list[str], split: str, words: str) -> None:
    """A key no chosen method takes is still refused; a mixed sweep still refuses calibration on scored data."""
    data = _config({"method": methods}, eval={"tasks": ["capitals", "add"]})
    data["adapters"] = _calibrated(split=split)
    with pytest.raises(MergeConfigError, match=words) as caught:
        sweep_config_from_dict(data, REPO)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_a_mixed_sweep_with_learned_runs_in_memory_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """#24 end to end: data-free points and learned points (calibrated first, `steps: 2`) in one sweep, each
    scored on validation; the test split's rows include each method's default."""
    pytest.importorskip("lm_eval")
    from mergekit_lite import load_config
    from mergekit_lite.sweep import load_sweep_config, run_sweep

    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "cache"))
    data = _config({"method": ["task_arithmetic", "learned"], "parameters": {"lambda": [1.0], "steps": [0, 2]}},
                   eval={"tasks": ["capitals", "add"], "limit": 8, "batch_size": 16})
    data["adapters"] = _calibrated()
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_sweep(load_sweep_config(path), tmp_path / "report", progress=False, device="cpu")
    assert sorted(row.name for row in result.rows) == ["learned steps=0", "learned steps=2", "task_arithmetic lambda=1"]
    assert all(row.error is None and row.summary.get("answer_ll_retention") is not None for row in result.rows)
    names = [row.name for row in result.test_rows]
    assert any(name.startswith("chosen: ") for name in names)
    assert {"default: task_arithmetic", "default: learned"} <= set(names) | {f"default: {result.best.point.method}"}
    best = load_config(tmp_path / "report" / "best.yaml")
    assert best.method == result.best.point.method
    assert all(("calibration" in p) == (best.method == "learned") for p in best.adapter_params)
