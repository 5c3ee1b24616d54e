"""The calibration module (issue #24): where prompts come from, how they are drawn, tokenized, cut and padded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mergekit_lite.calibration import check_apart
from mergekit_lite.calibration.batches import encode, pad
from mergekit_lite.calibration.prompts import load_prompts, source_of
from mergekit_lite.errors import InputError, MergeConfigError


def source(tmp_path: Path, spec: str, size: int = 64, template: str | None = None):
    return source_of(spec, size, template, tmp_path, "adapters[0]")


def test_jsonl_prompt_or_text_is_used_exactly_as_written(tmp_path: Path) -> None:
    rows = [{"prompt": "  Q: two  spaces\n\nA:"}, {"text": "plain text\twith tab", "other": 1}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    prompts = load_prompts(source(tmp_path, "p.jsonl"), seed=0)
    assert sorted(prompts) == sorted(["  Q: two  spaces\n\nA:", "plain text\twith tab"])


def test_template_builds_prompts_from_fields_like_doc_to_text(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"question": "capital of X", "answer": "Y"}\n')
    prompts = load_prompts(source(tmp_path, "d.jsonl", template="Q: {{question}}\nA:"), seed=0)
    assert prompts == ["Q: capital of X\nA:"]


def test_txt_is_one_prompt_a_line(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first\n\n  second line\n")
    assert sorted(load_prompts(source(tmp_path, "p.txt"), seed=0)) == ["  second line", "first"]


def test_draw_is_seeded_and_sized(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(100)))
    a = load_prompts(source(tmp_path, "p.txt", size=10), seed=7)
    assert a == load_prompts(source(tmp_path, "p.txt", size=10), seed=7)
    assert len(a) == 10 and len(set(a)) == 10
    assert a != load_prompts(source(tmp_path, "p.txt", size=10), seed=8)
    assert len(load_prompts(source(tmp_path, "p.txt", size=500), seed=0)) == 100


def test_a_name_without_a_suffix_is_an_lm_eval_task_and_paths_resolve_against_the_config(tmp_path: Path) -> None:
    assert source(tmp_path, "capitals").kind == "task"
    jsonl = source(tmp_path, "data/p.jsonl")
    assert jsonl.kind == "jsonl" and jsonl.reference == str((tmp_path / "data" / "p.jsonl").resolve())
    with pytest.raises(MergeConfigError, match="calibration_size"):
        source(tmp_path, "p.jsonl", size=0)
    with pytest.raises(MergeConfigError, match="placeholders"):
        source(tmp_path, "p.jsonl", template="no fields")


@pytest.mark.slow
def test_suite_task_renders_its_validation_documents_never_test(tmp_path: Path) -> None:
    """The suite's tasks have no training split: their validation documents, rendered by doc_to_text."""
    from mergekit_lite.evaluation.tasks import SUITE_DIR

    prompts = load_prompts(source(tmp_path, "capitals", size=1000), seed=0)
    rows = [json.loads(line) for line in (SUITE_DIR / "data" / "capitals" / "validation.jsonl").read_text().splitlines()
            if line.strip()]
    assert sorted(prompts) == sorted(f"Q: {row['question']}\nA:" for row in rows)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, BOS (1) in front by default."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_long_prompts_are_cut_from_the_left_keeping_bos_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ids = encode(_CharTokenizer(), ["abcdefghij", "xy"], max_length=8, where="adapters[0]", room=2)
    assert ids == [[1, *map(ord, "fghij")], [1, ord("x"), ord("y")]]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["adapters[0]: 1 of 2 prompts were longer than 6 tokens and were cut from the left"]
    with pytest.raises(InputError, match="no room"):
        encode(_CharTokenizer(), ["a"], max_length=4, where="adapters[0]", room=4)


def test_padding_sides_and_mask() -> None:
    right = pad([[5, 6, 7], [8]], pad_id=0)
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left.lengths == [3, 1]
    assert left.attention_mask.dtype == torch.long


def test_calibration_on_the_sweeps_own_evaluation_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "validation.jsonl").write_text('{"prompt": "x"}\n')
    taken = source(tmp_path, "validation.jsonl")
    with pytest.raises(MergeConfigError, match="also the validation data"):
        check_apart([taken], [tmp_path / "validation.jsonl"], "validation data")
    check_apart([source(tmp_path, "train.jsonl")], [tmp_path / "validation.jsonl"], "validation data")
