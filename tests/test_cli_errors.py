"""Bad command lines and bad config values (issue #23): exit 2, exactly one `error:` line, nothing written.

Two catalogues beside tests/test_bad_inputs.py (which damages input files):
- click-level mistakes on every command (a bad option value, a missing argument, an unknown option or command,
  `--out` a file): one line naming the command and what is wrong, instead of click's four-line usage block;
- config values that used to pass the checks and fail later with exit 1 and a generic message, or be accepted
  silently: non-finite or overflowing numbers, slerp's t outside [0, 1], booleans or strings where a number
  belongs, two inputs with one label, a filter that gives its value to no tensor, a symlink loop as a path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from mergekit_lite.cli import main

from .conftest import demo_merge, write_config

NAN, INF = float("nan"), float("inf")


def one_error_line(result: Any) -> str:
    """The single non-empty line of the command's whole output (stdout and stderr), which must be an error."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), prog_name="merge")


# -- click-level mistakes -----------------------------------------------------------------------------------
CLICK_CASES: dict[str, tuple[list[str], str]] = {
    "merge: unknown command": (["bogus"], "merge: No such command 'bogus'"),
    "merge: unknown option": (["--bogus"], "merge: No such option '--bogus'"),
    "run: missing config": (["run"], "merge run: Missing argument 'CONFIG'"),
    "run: config is a folder": (["run", "{tmp}"], "is a directory"),
    "run: unknown option": (["run", "{cfg}", "--outt", "x"], "No such option '--outt'. Did you mean '--out'?"),
    "run: extra argument": (["run", "{cfg}", "more"], "unexpected extra argument (more)"),
    "run: --workers 0": (["run", "{cfg}", "--workers", "0"], "Invalid value for '--workers': 0 is not in the range"),
    "run: --chunk-rows 0": (["run", "{cfg}", "--chunk-rows", "0"], "Invalid value for '--chunk-rows'"),
    "run: --max-memory lots": (["run", "{cfg}", "--max-memory", "lots"], "Invalid value for '--max-memory': not a size"),
    "run: --max-memory 0": (["run", "{cfg}", "--max-memory", "0"], "Invalid value for '--max-memory'"),
    "run: --out empty": (["run", "{cfg}", "--out", ""], "Invalid value for '--out': must name a folder"),
    "run: --workers without a value": (["run", "{cfg}", "--workers"], "Option '--workers' requires an argument"),
    "inspect: --sample 0": (["inspect", "{cfg}", "--sample", "0"], "merge inspect: Invalid value for '--sample'"),
    "inspect: --out a file": (["inspect", "{cfg}", "--out", "{file}"], "is a file"),
    "inspect: --format xml": (["inspect", "{cfg}", "--format", "xml"], "'xml' is not one of"),
    "inspect: --density words": (["inspect", "{cfg}", "--density", "lots"], "'lots' is not a valid float"),
    "eval: no target": (["eval"], "merge eval: Missing argument"),
    "eval: --limit -1": (["eval", "{cfg}", "--limit", "-1"], "Invalid value for '--limit'"),
    "eval: --batch-size 0": (["eval", "{cfg}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    "eval: --num-fewshot -1": (["eval", "{cfg}", "--num-fewshot", "-1"], "Invalid value for '--num-fewshot'"),
    "eval: --out a file": (["eval", "{cfg}", "--out", "{file}"], "is a file"),
    "sweep: --workers 0": (["sweep", "{cfg}", "--workers", "0"], "merge sweep: Invalid value for '--workers'"),
    "sweep: --max-points 0": (["sweep", "{cfg}", "--max-points", "0"], "Invalid value for '--max-points'"),
    "sweep: --backend slurm": (["sweep", "{cfg}", "--backend", "slurm"], "'slurm' is not one of"),
    "sweep: --out a file": (["sweep", "{cfg}", "--out", "{file}"], "is a file"),
    "verify: --atol -1": (["verify", "{tmp}", "--atol", "-1"], "Invalid value for '--atol'"),
    "verify: --atol nan": (["verify", "{tmp}", "--atol", "nan"], "Invalid value for '--atol': nan is not a finite"),
    "verify: --atol inf": (["verify", "{tmp}", "--atol", "inf"], "Invalid value for '--atol': inf is not a finite"),
    "verify: folder is a file": (["verify", "{file}"], "is a file"),
    "publish: no --repo-id": (["publish", "{tmp}"], "Missing option '--repo-id'"),
    "convert: missing config": (["convert"], "merge convert: Missing argument 'MERGEKIT_CONFIG'"),
    "--debug keeps it one line": (["--debug", "run", "{cfg}", "--workers", "0"], "Invalid value for '--workers'"),
}


@pytest.mark.parametrize("case", list(CLICK_CASES))
def test_a_click_level_mistake_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    argv, expected = CLICK_CASES[case]
    (tmp_path / "file").write_text("mine")
    config = write_config(tmp_path, {"base_model": "b", "method": "linear", "adapters": ["a"], "output": "o"})
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(tmp=tmp_path, cfg=config, file=tmp_path / "file") for a in argv]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert expected in line and line.endswith("--help'"), line  # and says where the help is
    assert "Usage:" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "file").read_text() == "mine"


def test_help_version_and_a_bare_merge_still_print_what_they_did() -> None:
    assert invoke("--help").exit_code == 0 and "Usage: merge [OPTIONS] COMMAND" in invoke("--help").output
    run_help = invoke("run", "--help")
    assert run_help.exit_code == 0 and "--max-memory" in run_help.output
    assert invoke("--version").exit_code == 0 and "version" in invoke("--version").output
    bare = invoke()  # no command: click's help, as before (not an error line)
    assert "Commands:" in bare.output


# -- config values --------------------------------------------------------------------------------------------
def slerp(t: Any) -> dict[str, Any]:
    return {"method": "slerp", "parameters": {"t": t}}


def adapters(demo: Path, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"adapters": [{"path": str(demo / "adapters" / "style"), **entries[0]}, *entries[1:]]}


CONFIG_CASES: dict[str, tuple[Callable[[Path, Path], dict[str, Any]], str]] = {
    # numbers must be finite, and within float32's range (beyond it the merge is inf on its first product)
    "lambda NaN": (lambda d, t: {"parameters": {"lambda": NAN}}, "parameters: 'lambda' must be a finite number"),
    "lambda inf": (lambda d, t: {"parameters": {"lambda": INF}}, "parameters: 'lambda' must be a finite number"),
    "lambda 1e308": (lambda d, t: {"parameters": {"lambda": -1e308}}, "'lambda' must be a finite number of magnitude"),
    "lambda gradient with NaN": (lambda d, t: {"parameters": {"lambda": [1, NAN]}}, "'lambda' must be a finite"),
    "slerp t NaN": (lambda d, t: slerp(NAN), "parameters: 't' must be a finite number"),
    "weight NaN": (lambda d, t: adapters(d, {"weight": NAN}), "adapters[0].weight: must be a finite number, got nan"),
    "weight -inf": (lambda d, t: adapters(d, {"weight": -INF}), "adapters[0].weight: must be a finite number"),
    "weight 1e300": (lambda d, t: adapters(d, {"weight": 1e300}), "adapters[0].weight: must be a finite number of"),
    "weight filter value NaN": (lambda d, t: adapters(d, {"weight": [{"filter": "mlp", "value": NAN}, {"value": 1}]}),
                                "adapters[0].weight: must be a finite number"),
    "density NaN": (lambda d, t: {"method": "ties", "parameters": {"density": NAN}}, "'density' must be a finite"),
    "shard_size inf": (lambda d, t: {"output": {"path": str(t), "shard_size": INF}}, "output.shard_size: not a finite"),
    # slerp's t lies in [0, 1] (SEMANTICS §3): no silent extrapolation
    "slerp t 1.5": (lambda d, t: slerp(1.5), "'t' must be in [0, 1]"),
    "slerp t -0.5": (lambda d, t: slerp(-0.5), "'t' must be in [0, 1]"),
    "slerp t gradient [0, 5]": (lambda d, t: slerp([0, 5]), "got 5.0"),
    # true/false or a quoted number where a number belongs
    "output.rank true": (lambda d, t: {"output": {"path": str(t), "format": "peft", "rank": True}},
                         "output.rank: must be a number, not true/false"),
    "output.rank '4'": (lambda d, t: {"output": {"path": str(t), "format": "peft", "rank": "4"}},
                        "output.rank: must be a number, not a string"),
    "seed true": (lambda d, t: {"seed": True}, "seed: must be a number, not true/false"),
    "eval.limit true": (lambda d, t: {"eval": {"limit": True}}, "eval.limit: must be a number, not true/false"),
    "eval.num_fewshot '2'": (lambda d, t: {"eval": {"num_fewshot": "2"}}, "eval.num_fewshot: must be a number"),
    "eval.batch_size true": (lambda d, t: {"eval": {"batch_size": True}}, "eval.batch_size: must be a number"),
    "eval.tasks empty": (lambda d, t: {"eval": {"tasks": []}}, "eval.tasks: an empty list would run the whole suite"),
    # two inputs with one label would mix up scores, the card and sweep weights
    "the same adapter twice": (lambda d, t: adapters(d, {}, {"path": str(d / "adapters" / "style")}),
                               "adapters[1]: label 'style' (its folder's name) is also adapters[0]'s"),
    "two folders of one name": (lambda d, t: adapters(d, {}, {"path": str(t.parent / "copy" / "style")}),
                                "give each a distinct 'name:'"),
    "the same name twice": (lambda d, t: adapters(d, {"name": "x"}, {"path": str(d / "adapters" / "facts"),
                                                                    "name": "x"}),
                            "adapters[1]: name 'x' is also adapters[0]'s"),
    # a filter must give its value to some tensor
    "weight filter matches nothing": (
        lambda d, t: adapters(d, {"weight": [{"filter": "mlpp", "value": 1}, {"value": 0.5}]}),
        "adapters[0].weight[0]: filter 'mlpp' matches no tensor of the base model"),
    "parameter filter matches nothing": (
        lambda d, t: {"parameters": {"lambda": [{"filter": "self_atn", "value": 2}, {"value": 1}]}},
        "parameters.lambda[0]: filter 'self_atn' matches no tensor"),
    "per-adapter filter shadowed": (
        lambda d, t: {"method": "ties", "parameters": {"density": 0.5}, **adapters(
            d, {"density": [{"filter": "proj", "value": 0.5}, {"filter": "q_proj", "value": 0.3}, {"value": 1}]},
            {"path": str(d / "adapters" / "facts")})},
        "adapters[0].density[1]: filter 'q_proj' never applies"),
    # a path must name something (an empty one would be the config's own folder)
    "output path empty": (lambda d, t: {"output": {"path": ""}}, "output.path: must name a folder, got an empty"),
    "base_model blank": (lambda d, t: {"base_model": " "}, "base_model: must name a folder"),
    "adapter path empty": (lambda d, t: adapters(d, {"path": ""}), "adapters[0].path: must name a folder"),
    "adapter path of an unknown ~user": (lambda d, t: adapters(d, {"path": "~no_such_user_here/style"}),
                                         "its '~' names no home folder here"),
    # a symlink loop as a path
    "base is a symlink loop": (lambda d, t: {"base_model": str(t.parent / "loop")}, "cannot be resolved (a symlink loop)"),
    "adapter is a symlink loop": (lambda d, t: adapters(d, {"path": str(t.parent / "loop")}),
                                  "cannot be resolved (a symlink loop)"),
    "output is inside a symlink loop": (lambda d, t: {"output": {"path": str(t.parent / "loop" / "merged")}},
                                        "cannot be resolved (a symlink loop)"),
}


@pytest.fixture
def workspace(demo: Path, tmp_path: Path) -> Path:
    """A folder with a symlink loop (loop -> loop2 -> loop) and a copy of the style adapter under another folder."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    import shutil

    shutil.copytree(demo / "adapters" / "style", tmp_path / "copy" / "style")
    return tmp_path


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_config_value_is_one_line_exit_2_before_anything_is_written(case: str, demo: Path,
                                                                           workspace: Path) -> None:
    change, expected = CONFIG_CASES[case]
    out = workspace / "merged"
    config = write_config(workspace / "cfg", demo_merge(demo, out, **change(demo, out)))
    before = sorted(p.name for p in workspace.iterdir())
    result = invoke("run", str(config), "--device", "cpu", "--no-progress")
    assert result.exit_code == 2, (result.output, result.exception)
    assert expected in one_error_line(result)
    assert sorted(p.name for p in workspace.iterdir()) == before and not out.exists()


@pytest.mark.parametrize("output", [".", "..", "{cfg}", "--out ."])
def test_an_output_that_holds_the_config_file_is_refused_even_with_overwrite(output: str, demo: Path,
                                                                            workspace: Path) -> None:
    """`--overwrite` replaces the output folder whole: never the folder the config (and the user's notes) sit in."""
    folder = workspace / "cfg"
    in_config = output.format(cfg=folder) if not output.startswith("--") else str(workspace / "merged")
    config = write_config(folder, demo_merge(demo, Path(in_config)))
    (folder / "notes.txt").write_text("mine")
    extra = ["--out", str(folder)] if output.startswith("--") else []
    result = invoke("run", str(config), "--device", "cpu", "--no-progress", "--overwrite", *extra)
    assert result.exit_code == 2, result.output
    assert f"holds the config file {config}" in one_error_line(result)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine" and not (workspace / "merged").exists()


def test_out_through_a_symlink_loop_is_one_line(demo: Path, workspace: Path) -> None:
    config = write_config(workspace / "cfg", demo_merge(demo, workspace / "merged"))
    result = invoke("run", str(config), "--out", str(workspace / "loop" / "merged"))
    assert result.exit_code == 2 and "cannot be resolved (a symlink loop)" in one_error_line(result)


def test_the_fixes_the_messages_suggest_are_accepted(demo: Path, tmp_path: Path) -> None:
    """Distinct names for one folder, a filter list that matches, t at both ends: each plans cleanly."""
    style = str(demo / "adapters" / "style")
    fixed = [
        adapters(demo, {"name": "once"}, {"path": style, "name": "twice"}),
        adapters(demo, {"weight": [{"filter": "mlp", "value": 1}, {"value": 0.5}]}),
        {**slerp(0), "adapters": [{"path": style}]},
        {**slerp([0, 1]), "adapters": [{"path": style}]},
        {"parameters": {"lambda": 3.0e38}},
    ]
    for index, change in enumerate(fixed):
        config = write_config(tmp_path, demo_merge(demo, tmp_path / "merged", **change), name=f"{index}.yaml")
        result = invoke("run", str(config), "--dry-run")
        assert result.exit_code == 0, (change, result.output)


@pytest.mark.slow  # imports lm-eval (seconds)
@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_broken_task_yaml_is_one_line(where: str, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from .conftest import REPO

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.yaml").write_text("task: broken\ndataset_path: [unclosed\n")
    (folder / "fine.yaml").write_text("task: fine\ndataset_path: json\n")  # lm-eval alone would run this, silently
    (folder / "choices.yaml").write_text("- a\n- b\n")  # YAML that is no task: skipped, as lm-eval does
    target = folder / "broken.yaml" if where == "file" else folder
    suite_base = REPO / "mergekit_lite" / "evaluation" / "suite" / "base"
    result = invoke("eval", str(suite_base), "--tasks", str(target), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"{folder / 'broken.yaml'} is not a readable lm-eval task YAML" in line and "line 3" in line, line
    assert not (tmp_path / "r").exists()
    if where == "folder":  # fixed, the folder's one task loads and the YAML that is no task is skipped
        from mergekit_lite.evaluation.tasks import tasks_defined_in

        (folder / "broken.yaml").unlink()
        assert tasks_defined_in(folder) == ["fine"]


def test_yaml_dump_of_nan_is_what_the_cases_write() -> None:
    """The catalogue writes NaN and inf through yaml.safe_dump: they reach the config as YAML's .nan / .inf."""
    assert yaml.safe_dump({"x": NAN, "y": -INF}).split() == ["x:", ".nan", "y:", "-.inf"]


@pytest.mark.parametrize("relative", ["adapters/style/adapter_config.json", "adapters/style/adapter_model.safetensors",
                                      "base/config.json", "base/model.safetensors"])
def test_a_file_inside_an_input_that_is_a_symlink_loop_is_one_line(relative: str, demo_copy: Path,
                                                                   tmp_path: Path) -> None:
    """Not "no such file" (the user would look for a missing file), and never silently left out (config.json)."""
    path = demo_copy / relative
    path.unlink()
    path.symlink_to(path.with_name(path.name + ".other"))
    path.with_name(path.name + ".other").symlink_to(path)
    out = tmp_path / "merged"
    config = write_config(tmp_path / "cfg", demo_merge(demo_copy, out, adapters=[str(demo_copy / "adapters" / "style")]))
    result = invoke("run", str(config), "--device", "cpu", "--no-progress")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert str(path.parent) in line and ("leads nowhere" in line or "Symlink loop" in line), line
    assert not out.exists()
