"""The config is a strict contract: typos are errors with a hint, paths resolve from the config's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_lite import MergeConfig, MergeConfigError, load_config
from mergekit_lite.units import parse_size

from .conftest import write_config

MINIMAL = {"base_model": "base", "method": "linear", "adapters": [{"path": "a"}], "output": {"path": "out"}}


def with_changes(**changes: object) -> dict:
    return {**MINIMAL, **changes}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (with_changes(sede=1), "unknown key 'sede' (did you mean 'seed'?)"),
        (with_changes(method="linaer"), "unknown merge method 'linaer' (did you mean 'linear'?)"),
        (with_changes(method="task_arithmetic", parameters={"lamda": 2}), "did you mean 'lambda'?"),
        (with_changes(output={"path": "o", "shard_sise": "1GB"}), "did you mean 'shard_size'?"),
        (with_changes(adapters=[{"path": "a", "wieght": 2}]), "did you mean 'weight'?"),
        (with_changes(adapters=[{"path": "a", "normalize": False}]), "global parameter of 'linear'"),
        (with_changes(adapters=[]), "non-empty list"),
        (with_changes(adapters=[{"weight": 1}]), "missing required key 'path'"),
        (with_changes(output={"path": "o", "dtype": "fp8"}), "output.dtype"),
        (with_changes(output={"path": "o", "shard_size": "lots"}), "not a size"),
        (with_changes(adapters=[{"path": "a", "weight": 1}, {"path": "b", "weight": -1}]), "sum of the adapter weights"),
        ({k: v for k, v in MINIMAL.items() if k != "method"}, "missing required key 'method'"),
    ],
)
def test_bad_configs_are_errors_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(MergeConfigError, match=None) as caught:
        MergeConfig.from_dict(data)
    assert message in str(caught.value)


def test_relative_paths_resolve_from_the_config_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path / "configs", MINIMAL)
    config = load_config(path)
    assert config.resolve_path(config.base_model) == (tmp_path / "configs" / "base").resolve()
    assert config.output_path == (tmp_path / "configs" / "out").resolve()


def test_defaults_are_filled_and_recorded() -> None:
    config = MergeConfig.from_dict(with_changes(method="task_arithmetic"))
    assert config.global_params == {"lambda": 1.0}
    assert config.weights == [1.0]
    assert config.output.shard_size == 5 * 10**9
    assert config.seed == 0
    assert "lambda: 1.0" in config.to_yaml()


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, with_changes(sede=3))
    with pytest.raises(MergeConfigError, match="config.yaml: config: unknown key 'sede'"):
        load_config(path)


def test_linear_without_normalize_accepts_weights_summing_to_zero() -> None:
    data = with_changes(adapters=[{"path": "a", "weight": 1}, {"path": "b", "weight": -1}], parameters={"normalize": False})
    assert MergeConfig.from_dict(data).weights == [1.0, -1.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1.5kB", 1500), (123, 123), ("77", 77)],
)
def test_sizes_parse_like_hugging_face(text: object, expected: int) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "GB", "-1", 0, "5 parsecs", True])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]
