"""`merge run` from the command line: summaries, dry runs, one-line errors and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergekit_lite.cli import main

from .conftest import REPO, demo_merge, write_config


def test_run_prints_a_summary_and_writes_the_checkpoint(demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, demo_merge(demo, tmp_path / "out"))
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "merged 14 tensors, copied 7" in result.output and "peak RSS" in result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_dry_run_prints_the_plan_and_writes_nothing(demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, demo_merge(demo, tmp_path / "out"))
    result = CliRunner().invoke(main, ["run", str(config), "--dry-run", "--chunk-rows", "8"])
    assert result.exit_code == 0, result.output
    assert "adapter 'style' weight 1" in result.output and "model.layers.0.self_attn.q_proj.weight" in result.output
    assert "forced 8 rows" in result.output and "nothing written" in result.output
    assert not (tmp_path / "out").exists()


def test_out_flag_overrides_the_config(demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, demo_merge(demo, tmp_path / "out"))
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(tmp_path / "elsewhere"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "model.safetensors").is_file() and not (tmp_path / "out").exists()


def test_bad_config_is_one_line_on_stderr_with_exit_code_2(demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {**demo_merge(demo, tmp_path / "out"), "methd": "x"})
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'methd' (did you mean 'method'?)" in result.stderr
    assert "Traceback" not in result.output


def test_existing_output_exits_2_and_debug_shows_the_traceback(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    config = write_config(tmp_path, demo_merge(demo, tmp_path / "out"))
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    debug = CliRunner().invoke(main, ["--debug", "run", str(config)])
    assert debug.exit_code != 0 and debug.exc_info is not None and debug.exc_info[0].__name__ == "OutputExistsError"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: there is no missing CUDA to report")
def test_missing_cuda_is_a_clear_error(demo: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, demo_merge(demo, tmp_path / "out"))
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr


def test_every_shipped_config_plans_cleanly(tmp_path: Path) -> None:
    configs = sorted((REPO / "merge_configs").glob("*.yaml"))
    assert configs
    for config in configs:
        if "\nsweep:" in config.read_text():  # a `merge sweep` config: checked as one (every method's point config)
            from mergekit_lite.sweep import load_sweep_config

            load_sweep_config(config)
            continue
        if "\nmethod:" not in "\n" + config.read_text():  # a `merge inspect` config (no method): checked as one
            from mergekit_lite.inspection.inputs import load_inspect_config

            load_inspect_config(config)
            continue
        result = CliRunner().invoke(main, ["run", str(config), "--dry-run"])
        assert result.exit_code == 0, f"{config.name}: {result.output}"


def test_methods_lists_the_registry() -> None:
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0 and "task_arithmetic" in result.output and "arxiv.org" in result.output
