"""House rules: a MergeConfig built in Python is checked like one read from YAML; the card `merge run` rewrites
after evaluating is replaced atomically; the offline eval suite ships inside the package."""

from __future__ import annotations

import configparser
import importlib.resources
import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import mergekit_lite.evaluation
from mergekit_lite import MergeConfig, MergeConfigError
from mergekit_lite.config import AdapterSpec, OutputSpec
from mergekit_lite.evaluation import lm_eval_runner
from mergekit_lite.evaluation.after_merge import RUN_REPORT_DIR, evaluate_after_merge
from mergekit_lite.evaluation.report import EvalReport
from mergekit_lite.evaluation.tasks import LL_SUFFIX, SUITE_DIR, SUITE_TASKS, suite_tasks_dir
from mergekit_lite.methods import get_method
from mergekit_lite.writers import card as card_module
from mergekit_lite.writers.card import replace_card

from .conftest import REPO

# ------------------------------------------------------------------------------ MergeConfig(...) validates


def _fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "base_model": "base",
        "method": "linear",
        "adapters": [{"path": "a"}, {"path": "b", "weight": 0.5}],
        "output": {"path": "out"},
    }
    return {**fields, **changes}


def _both_ways(fields: dict[str, Any]) -> list[str]:
    """The error messages of direct construction and of from_dict for the same fields (both must raise)."""
    messages = []
    for build in (lambda: MergeConfig(**fields), lambda: MergeConfig.from_dict(fields)):
        with pytest.raises(MergeConfigError) as caught:
            build()
        messages.append(str(caught.value))
    return messages


def test_direct_construction_refuses_an_unknown_method_with_a_suggestion() -> None:
    direct, from_dict = _both_ways(_fields(method="tie"))
    assert direct == from_dict
    assert "unknown merge method 'tie'" in direct and "did you mean 'ties'" in direct


def test_direct_construction_refuses_an_unknown_parameter_with_a_suggestion() -> None:
    direct, from_dict = _both_ways(_fields(method="ties", parameters={"densty": 0.5}))
    assert direct == from_dict == "parameters: method 'ties' takes no parameter 'densty' (did you mean 'density'?)"


def test_direct_construction_refuses_ties_without_a_density() -> None:
    direct, from_dict = _both_ways(_fields(method="ties"))
    assert direct == from_dict
    assert direct.startswith("method 'ties' needs 'density'")


@pytest.mark.parametrize("changes, message", [
    ({"sed": 3}, "config: unknown key 'sed' (did you mean 'seed'?)"),
    ({"output": {"path": "out", "dtyp": "float16"}}, "output: unknown key 'dtyp' (did you mean 'dtype'?)"),
    ({"method": "ties", "adapters": [{"path": "a", "densty": 0.5}]},
     "adapters[0]: unknown key 'densty' for method 'ties' (did you mean 'density'?)"),
    ({"method": "ties", "parameters": {"density": 0}}, "parameters: 'density' must be in (0, 1], got 0.0"),
    ({"adapters": []}, "adapters: must be a non-empty list"),
])
def test_direct_construction_gives_the_messages_a_config_file_gets(changes: dict[str, Any], message: str) -> None:
    direct, from_dict = _both_ways(_fields(**changes))
    assert message in direct
    assert message in from_dict


def test_pydantic_problems_of_direct_construction_are_config_errors_too() -> None:
    with pytest.raises(MergeConfigError, match=r"adapters\[0\]\.weight: .*number"):
        MergeConfig(**_fields(adapters=[{"path": "a", "weight": "heavy"}]))
    with pytest.raises(MergeConfigError, match=r"eval\.limit: .*a count \(≥ 1\) or a fraction"):
        MergeConfig(**_fields(eval={"limit": 0}))


def test_a_valid_direct_config_has_its_defaults_filled_like_from_dict() -> None:
    fields = _fields(method="ties", parameters={"density": 0.5}, adapters=["a", {"path": "b", "density": 0.25}])
    config = MergeConfig(**fields)
    defaults = {param.name: param.default for param in get_method("ties").params}
    assert config.global_params == {**defaults, "density": 0.5}
    assert {"sign": "sum", "normalize": True, "lambda": 1.0}.items() <= config.global_params.items()
    assert config.adapter_params == [{"density": 0.5}, {"density": 0.25}]
    assert config.to_dict() == MergeConfig.from_dict(fields).to_dict()
    assert config.config_dir == Path.cwd()
    assert MergeConfig(**_fields()).global_params == {"normalize": True}


def test_direct_construction_also_takes_parameters_and_models_as_python_callers_write_them() -> None:
    config = MergeConfig(base_model="base", method="ties", output=OutputSpec(path="out"),
                         adapters=[AdapterSpec(path="a", parameters={"density": 0.3}),
                                   {"path": "b", "parameters": {"density": 0.75}}])
    assert config.adapter_params == [{"density": 0.3}, {"density": 0.75}]
    assert config.global_params["sign"] == "sum"
    with pytest.raises(MergeConfigError, match="missing required key 'output'"):
        MergeConfig(base_model="base", method="linear", adapters=["a"])


def test_from_dict_still_sets_the_folder_relative_paths_resolve_from(tmp_path: Path) -> None:
    config = MergeConfig.from_dict(_fields(), base_dir=tmp_path)
    assert config.config_dir == tmp_path.resolve()
    assert config.output_path == tmp_path.resolve() / "out"
    assert config.with_output_path(tmp_path / "elsewhere").config_dir == tmp_path.resolve()


def test_from_dict_runs_the_config_file_checks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_dict checks a file's fields, then the model validates them without checking them a second time;
    a direct construction checks them once too, with the same result."""
    from mergekit_lite import config as config_module

    calls: list[int] = []
    checked = config_module._checked_fields
    monkeypatch.setattr(config_module, "_checked_fields", lambda *a, **k: calls.append(1) or checked(*a, **k))
    from_file = MergeConfig.from_dict(_fields(method="ties", adapters=[{"path": "a", "density": 0.5}]))
    assert len(calls) == 1
    direct = MergeConfig(**_fields(method="ties", adapters=[{"path": "a", "density": 0.5}]))
    assert len(calls) == 2 and direct.to_dict() == from_file.to_dict()


# ------------------------------------------------------------------------- the card is replaced atomically


OLD_CARD = "---\nlicense: mit\n---\n\n# the merge's own card\n"


def _merged_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "README.md").write_text(OLD_CARD)
    os.chmod(folder / "README.md", 0o640)
    return folder


def test_replace_card_replaces_the_whole_file_and_keeps_its_permissions(tmp_path: Path) -> None:
    folder = _merged_folder(tmp_path)
    replace_card(folder, "# new card ᵢ\n")
    assert (folder / "README.md").read_text(encoding="utf-8") == "# new card ᵢ\n"
    assert stat.S_IMODE((folder / "README.md").stat().st_mode) == 0o640
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


def test_a_failure_in_the_middle_of_writing_the_card_leaves_the_old_card(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _merged_folder(tmp_path)

    def disk_full(fd: int) -> None:  # the new text is in the temporary file, not yet on disk nor in place
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(card_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        replace_card(folder, "# new card\n" * 10_000)
    assert (folder / "README.md").read_text() == OLD_CARD
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]  # the temporary file went too


@pytest.mark.slow  # a fresh interpreter imports mergekit_lite (about 2 s)
def test_a_process_killed_while_writing_the_card_leaves_the_old_card(tmp_path: Path) -> None:
    folder = _merged_folder(tmp_path)
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mergekit_lite.writers import card\n"
        "card.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "card.replace_card(Path(sys.argv[1]), '# new card\\n' * 100_000)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (folder / "README.md").read_text() == OLD_CARD


def _fake_run(models: list[Any], out_dir: Path, fail_after_first: bool = False, **_: Any) -> EvalReport:
    """Stands in for lm-eval: writes a report folder the way evaluate_models does, model by model."""
    out_dir = Path(out_dir)
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    files = []
    for model in models:
        path = out_dir / "results" / f"{model.name}.json"
        path.write_text(json.dumps({"results": {"add": {"acc,none": 0.5}}}))
        files.append(path)
        if fail_after_first:
            raise RuntimeError("lm-eval crashed half way")
    (out_dir / "report.md").write_text("# lm-eval report\n")
    files.append(out_dir / "report.md")
    return EvalReport(out_dir=out_dir, tasks=["add"], models=list(models),
                      scores={m.name: {"add": {"acc": 0.5}} for m in models}, retention={}, limit=None,
                      metrics=["acc"], lm_eval_version="test", files=files)


def _result(demo: Path, folder: Path) -> Any:
    config = MergeConfig.from_dict({
        "base_model": str(demo / "base"), "method": "linear",
        "adapters": [{"path": str(demo / "adapters" / "math")}], "output": {"path": str(folder)},
        "eval": {"tasks": ["add"], "limit": 2},
    })
    return SimpleNamespace(config=config, output_dir=folder, device="cpu", output_format="checkpoint",
                           card_sections=[])


def test_merge_run_evaluation_swaps_in_the_report_then_the_card(demo: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _merged_folder(tmp_path)
    monkeypatch.setattr(lm_eval_runner, "evaluate_models", _fake_run)
    summary = evaluate_after_merge(_result(demo, folder), progress=False)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "## Evaluation" in card and "| add |" in card
    assert stat.S_IMODE((folder / "README.md").stat().st_mode) == 0o640
    report_dir = folder / RUN_REPORT_DIR
    assert (report_dir / "report.md").is_file() and (report_dir / "results" / "merged.json").is_file()
    assert f"report: {report_dir.resolve() / 'report.md'}" in summary  # the final folder, not the staging one
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", RUN_REPORT_DIR]  # no staging left behind

    (report_dir / "stale.txt").write_text("from the previous evaluation")  # a second evaluation replaces eval/
    evaluate_after_merge(_result(demo, folder), progress=False)
    assert not (report_dir / "stale.txt").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", RUN_REPORT_DIR]


def test_an_evaluation_failing_half_way_leaves_the_card_and_no_partial_report(demo: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _merged_folder(tmp_path)
    monkeypatch.setattr(lm_eval_runner, "evaluate_models",
                        lambda models, out_dir, **kw: _fake_run(models, out_dir, fail_after_first=True))
    with pytest.raises(RuntimeError, match="half way"):
        evaluate_after_merge(_result(demo, folder), progress=False)
    assert (folder / "README.md").read_text() == OLD_CARD
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


def test_a_card_that_cannot_be_rendered_leaves_the_old_card_and_no_report(demo: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _merged_folder(tmp_path)
    monkeypatch.setattr(lm_eval_runner, "evaluate_models", _fake_run)

    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("card template broke")

    monkeypatch.setattr(card_module, "render_card", broken)
    with pytest.raises(RuntimeError, match="card template"):
        evaluate_after_merge(_result(demo, folder), progress=False)
    assert (folder / "README.md").read_text() == OLD_CARD
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


def test_the_evaluated_card_keeps_the_sections_the_writer_wrote(demo: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The output kind and the writer's own sections come from the MergeResult, not from the old card (which
    here has neither: an adapter output's ranks and a calibration section must survive anyway)."""
    folder = _merged_folder(tmp_path)
    monkeypatch.setattr(lm_eval_runner, "evaluate_models", _fake_run)
    result = _result(demo, folder)
    result.output_format = "peft"
    result.card_sections = ["## Adapter\n\nranks [4].\n", "## Calibration\n\nlambdas.\n"]
    evaluate_after_merge(result, progress=False)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.index("## Adapter\n") < card.index("## Calibration\n") < card.index("Full lm-eval results")
    assert "library_name: peft" in card and "base_model_relation: adapter" in card


# -------------------------------------------------------------------------- the eval suite is package data


def test_the_suite_resolves_inside_the_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGEKIT_LITE_EVAL_TASKS", raising=False)
    package = Path(mergekit_lite.evaluation.__file__).resolve().parent
    assert SUITE_DIR == package / "suite"
    assert suite_tasks_dir() == package / "suite" / "tasks"
    tasks = importlib.resources.files("mergekit_lite.evaluation") / "suite" / "tasks"
    for task in SUITE_TASKS:
        assert (tasks / f"{task}.yaml").is_file()
        assert (tasks / f"{task}{LL_SUFFIX}.yaml").is_file()
    for name in ("_multiple_choice_template", "_loglikelihood_template", "suite_data.py"):
        assert (tasks / name).is_file()


def test_the_task_yamls_read_their_data_from_the_suite_folder() -> None:
    spec = importlib.util.spec_from_file_location("suite_data_probe", SUITE_DIR / "tasks" / "suite_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DATA == SUITE_DIR / "data"
    for task in SUITE_TASKS:
        assert f"suite_task: {task}" in (SUITE_DIR / "tasks" / f"{task}.yaml").read_text()
        assert (module.DATA / task / "test.jsonl").is_file()
    for template in ("_multiple_choice_template", "_loglikelihood_template"):
        assert "custom_dataset: !function suite_data.load" in (SUITE_DIR / "tasks" / template).read_text()


def test_the_suite_holds_its_base_and_adapters_with_paths_inside_it() -> None:
    assert (SUITE_DIR / "base" / "model.safetensors").is_file()
    for task in SUITE_TASKS:
        adapter = SUITE_DIR / "adapters" / task
        assert (adapter / "adapter_model.safetensors").is_file()
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert (adapter / base).resolve() == (SUITE_DIR / "base").resolve()


def test_setup_cfg_package_data_covers_every_file_of_the_suite() -> None:
    """What the wheel carries (setup.cfg's patterns, relative to the package) is the whole suite folder."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    patterns = parser["options.package_data"]["mergekit_lite.evaluation"].split()
    package = REPO / "mergekit_lite" / "evaluation"
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    present = {p for p in (package / "suite").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert present - shipped == set(), "suite files setup.cfg does not ship"
    assert len(present) >= 37


# ---------------------------------------------------------------------------- layering: who imports whom


def test_the_engine_writes_to_a_sink_and_imports_no_writer() -> None:
    """The engine streams into engine.sink.TensorSink (merge run's sharded writer, the sweep's collector)."""
    import ast

    for path in (REPO / "mergekit_lite" / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "writers" not in (node.module or ""), f"{path.name} imports {node.module}"


def test_the_engine_api_and_writers_ask_a_phase_what_it_needs_never_its_type() -> None:
    """Phases declare what they need (methods/registry.PhaseNeeds: a statistics pass, factors, chunk combines,
    their sparsifier and kernel, a memory multiplier, PEFT output): no branch of the engine, the api, the config or
    the writers tests a phase's type or `MergeMethod.is_*`. `assert isinstance(..., SomePhase)` (type narrowing
    inside the one code path a declaration selected) is the allowed exception."""
    import ast

    package = REPO / "mergekit_lite"
    paths = [*(package / "engine").glob("*.py"), *(package / "writers").glob("*.py"), package / "api.py",
             package / "config.py"]
    asked = {"is_linear", "is_elementwise", "is_interpolation", "is_factored"}
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        narrowing = {id(node.test) for node in ast.walk(tree) if isinstance(node, ast.Assert)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in asked:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and id(node) not in narrowing and len(node.args) == 2
                    and "Phase" in ast.unparse(node.args[1])):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert found == [], "branch on a phase's declarations (PhaseNeeds) instead: " + ", ".join(found)
