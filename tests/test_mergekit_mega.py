"""mergekit-mega files (#29): several YAML documents, later ones naming earlier outputs, run in file order; each
output atomic; a failure stops the chain, keeps the finished outputs and names the document."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evals.full_models import build_corpus_models
from mergekit_lite.cli.commands import main

from .conftest import REPO
from .reference import load_checkpoint

MEGA = REPO / "merge_configs" / "mergekit" / "mega.yml"


@pytest.fixture
def corpus(demo: Path, tmp_path: Path) -> Path:
    """The models the mergekit corpus names, and its mega file, in a fresh folder."""
    folder = build_corpus_models(tmp_path / "corpus", demo)
    shutil.copy(MEGA, folder / "mega.yml")
    return folder


def _run(*args: str) -> object:
    return CliRunner().invoke(main, [*args])


def _same(first: Path, second: Path) -> bool:
    a, b = load_checkpoint(first), load_checkpoint(second)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_mega_file_equals_its_documents_run_one_after_the_other(corpus: Path) -> None:
    result = _run("run", str(corpus / "mega.yml"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "document 1 ('gradient-slerp') of 2" in result.output and "document 2 ('gradient-slerp-ties') of 2" in result.output
    first, second = yaml.safe_load_all(MEGA.read_text())
    first.pop("name"), second.pop("name")
    (corpus / "one").mkdir()
    (corpus / "one" / "first.yml").write_text(yaml.safe_dump({**first, "base_model": "../base", "slices": [
        {"sources": [{**s, "model": f"../{s['model']}"} for s in first["slices"][0]["sources"]]}]}))
    assert _run("run", str(corpus / "one" / "first.yml"), "--no-progress", "--out", str(corpus / "slerp-alone")).exit_code == 0
    second["models"][0]["model"] = "slerp-alone"
    (corpus / "second.yml").write_text(yaml.safe_dump(second))
    assert _run("run", str(corpus / "second.yml"), "--no-progress", "--out", str(corpus / "ties-alone")).exit_code == 0
    assert _same(corpus / "gradient-slerp", corpus / "slerp-alone")
    assert _same(corpus / "gradient-slerp-ties", corpus / "ties-alone")
    assert not _same(corpus / "gradient-slerp-ties", corpus / "gradient-slerp")


def test_convert_prints_one_config_per_document_and_they_run_as_the_mega_file(corpus: Path) -> None:
    printed = _run("convert", str(corpus / "mega.yml"), "--out", "final")
    assert printed.exit_code == 0, printed.output
    documents = list(yaml.safe_load_all(printed.stdout))
    assert [d["method"] for d in documents] == ["slerp", "ties"]
    assert [d["output"]["path"] for d in documents] == ["gradient-slerp", "final"]
    assert documents[1]["models"][0]["path"] == "gradient-slerp"  # the earlier output, by its folder
    (corpus / "ours.yaml").write_text(printed.stdout)
    assert _run("run", str(corpus / "ours.yaml"), "--no-progress").exit_code == 0
    shutil.move(corpus / "gradient-slerp", corpus / "ours-first")
    assert _run("run", str(corpus / "mega.yml"), "--no-progress", "--out", str(corpus / "direct")).exit_code == 0
    assert _same(corpus / "final", corpus / "direct") and _same(corpus / "ours-first", corpus / "gradient-slerp")
    assert not (corpus / "gradient-slerp-ties").exists()  # --out took the last document's place


def test_a_failing_document_stops_the_chain_and_keeps_the_finished_outputs(corpus: Path) -> None:
    text = MEGA.read_text().replace("model: ft_b", "model: ft_missing")
    (corpus / "mega.yml").write_text(text)
    result = _run("run", str(corpus / "mega.yml"), "--no-progress")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "document 2 ('gradient-slerp-ties') of 2 failed" in lines[0], result.stderr
    assert "finished and kept" in lines[0] and "ft_missing" in lines[0]
    assert (corpus / "gradient-slerp" / "model.safetensors").is_file()
    assert not (corpus / "gradient-slerp-ties").exists() and not list(corpus.glob(".gradient-slerp-ties*"))


@pytest.mark.parametrize("edit,message", [
    (lambda docs: docs.reverse(), r"document 1 \('gradient-slerp-ties'\) reads 'gradient-slerp', the output of "
                                  r"document 2 \('gradient-slerp'\), which comes after it"),
    (lambda docs: [d.pop("name") for d in docs], r"documents 1 and 2 have no 'name'"),
    (lambda docs: docs[1].update(name="gradient-slerp"), r"name 'gradient-slerp' is also document 1's"),
    (lambda docs: docs[0].update(name="../up"), r"'name' must be a folder name without slashes"),
    (lambda docs: docs[1].update(merge_method="frankenstein"), r"document 2 \('gradient-slerp-ties'\): .*method "
                                                               r"'frankenstein' has no mergekit_lite equivalent"),
    (lambda docs: docs[1].update(parameters="lambda=1"), r"document 2 .*'parameters': must be a mapping"),
])
def test_mega_files_that_cannot_run_in_order_are_refused_before_any_merge(
        corpus: Path, edit: object, message: str) -> None:
    documents = list(yaml.safe_load_all(MEGA.read_text()))
    edit(documents)  # type: ignore[operator]
    (corpus / "mega.yml").write_text(yaml.safe_dump_all(documents))
    before = sorted(p.name for p in corpus.iterdir())
    for command in ("run", "convert"):
        result = _run(command, str(corpus / "mega.yml"), *(["--no-progress"] if command == "run" else []))
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        import re
        assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in corpus.iterdir()) == before


def test_dry_run_of_a_mega_file_writes_nothing(corpus: Path) -> None:
    result = _run("run", str(corpus / "mega.yml"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "document 1 ('gradient-slerp') of 2" in result.output
    assert "reads gradient-slerp" in result.output
    assert not (corpus / "gradient-slerp").exists()


@pytest.mark.parametrize("command", ["inspect", "sweep"])
def test_commands_that_read_one_merge_say_so_for_a_mega_file(corpus: Path, command: str) -> None:
    result = _run(command, str(corpus / "mega.yml"), "--out", str(corpus / "report"))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "holds several YAML documents (a mergekit-mega file)" in lines[0]
    assert not (corpus / "report").exists()


def test_out_is_taken_from_the_working_folder_as_for_one_merge(corpus: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = _run("run", str(corpus / "mega.yml"), "--no-progress", "--out", "final")
    assert result.exit_code == 0, result.output
    assert (elsewhere / "final" / "model.safetensors").is_file() and not (corpus / "final").exists()
    assert (corpus / "gradient-slerp" / "model.safetensors").is_file()  # named documents: beside the file


def test_out_path_names_a_documents_folder(corpus: Path) -> None:
    """A document may give its folder as out_path (relative to the file); later ones read it by name or path."""
    first, second = yaml.safe_load_all(MEGA.read_text())
    first["out_path"] = "stage/one"
    (corpus / "mega.yml").write_text(yaml.safe_dump_all([first, second]))
    result = _run("run", str(corpus / "mega.yml"), "--no-progress")
    assert result.exit_code == 0, result.output
    assert (corpus / "stage" / "one" / "model.safetensors").is_file() and not (corpus / "gradient-slerp").exists()
    printed = list(yaml.safe_load_all(_run("convert", str(corpus / "mega.yml")).stdout))
    assert printed[1]["models"][0]["path"] == "stage/one"


def test_convert_reads_slices_over_an_earlier_output_through_its_base(corpus: Path) -> None:
    """A later document's slices over an earlier output not written yet: the layers are its base's."""
    first, _ = yaml.safe_load_all(MEGA.read_text())
    third = {"name": "again", "merge_method": "slerp", "base_model": "gradient-slerp", "parameters": {"t": 0.5},
             "dtype": "float32", "slices": [{"sources": [{"model": "gradient-slerp", "layer_range": [0, 2]},
                                                          {"model": "ft_c", "layer_range": [0, 2]}]}]}
    (corpus / "mega.yml").write_text(yaml.safe_dump_all([first, third]))
    printed = _run("convert", str(corpus / "mega.yml"))
    assert printed.exit_code == 0, printed.output
    assert list(yaml.safe_load_all(printed.stdout))[1]["base_model"] == "gradient-slerp"
    assert not (corpus / "gradient-slerp").exists()
    dry = _run("run", str(corpus / "mega.yml"), "--dry-run")
    assert dry.exit_code == 0 and "reads gradient-slerp" in dry.output and not (corpus / "gradient-slerp").exists()
    assert _run("run", str(corpus / "mega.yml"), "--no-progress").exit_code == 0
    assert (corpus / "again" / "model.safetensors").is_file()
