"""`method: learned` (issue #24): coefficients fitted on the adapters' own answers, streamed by the linear path.

Proofs: with `steps: 0` it is task_arithmetic at λ = init, byte for byte; whatever it learns, the written bytes are
task_arithmetic's given the learned λ as per-tensor weights; the λ gradient is the finite-difference gradient of
the loss (float64, tiny model); the same seed gives the same λ and bytes; the held-out loss falls; the adapter
output is the checkpoint's change (PEFT logits); the branches are the adapters exactly (PEFT logits, also Conv1D,
lora_bias and rank/alpha patterns).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_lite.api import merge, prepare
from mergekit_lite.config import MergeConfig

ADAPTERS = ("style", "facts", "math")
PROMPTS = ["Q: what is {n}?\nA:", "The {n}th word is", "Tell me about {n}:", "{n} plus one is", "Name {n} things:"]


def calibration_file(folder: Path, name: str, count: int = 20, field: str = "prompt") -> Path:
    """A JSONL of `count` short prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    rows = [{field: PROMPTS[i % len(PROMPTS)].format(n=i + len(name))} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def learned_config(demo: Path, tmp_path: Path, out: Path, **params: Any) -> dict[str, Any]:
    calibration = tmp_path / "calibration"
    return {
        "base_model": str(demo / "base"),
        "method": "learned",
        "parameters": {"steps": 4, "batch_size": 4, "max_new_tokens": 4, **params},
        "adapters": [{"path": str(demo / "adapters" / name), "calibration": str(calibration_file(calibration, name))}
                     for name in ADAPTERS],
        "output": {"path": str(out)},
    }


def run(data: dict[str, Any], tmp_path: Path) -> Path:
    config = MergeConfig.from_dict(data, tmp_path)
    result = merge(config, device="cpu", progress=False)
    assert result.output_dir is not None
    return result.output_dir


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "cache"))


def weights_of(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("start, lam", [({"init": 0.5}, 0.5), ({"init_method": "task_arithmetic"}, 1.0)])
def test_learned_with_zero_steps_is_task_arithmetic_at_init_byte_for_byte(start: dict[str, Any], lam: float,
                                                                          demo: Path, tmp_path: Path) -> None:
    learned = run(learned_config(demo, tmp_path, tmp_path / "learned", steps=0, **start), tmp_path)
    plain = learned_config(demo, tmp_path, tmp_path / "ta")
    plain.update(method="task_arithmetic", parameters={"lambda": lam})
    for entry in plain["adapters"]:
        del entry["calibration"]
    assert weights_of(learned) == weights_of(run(plain, tmp_path))
    record = json.loads((learned / "coefficients.json").read_text())
    assert {v for row in record["coefficients"].values() for v in row.values()} == {lam}


@pytest.mark.slow
def test_learned_bytes_are_task_arithmetic_with_the_learned_coefficients_as_weights(demo: Path, tmp_path: Path) -> None:
    learned = run(learned_config(demo, tmp_path, tmp_path / "learned", steps=6, lr=0.1), tmp_path)
    record = json.loads((learned / "coefficients.json").read_text())
    values = [v for row in record["coefficients"].values() for v in row.values()]
    assert len(set(values)) > 1, "the fit should move the coefficients apart"
    plain = learned_config(demo, tmp_path, tmp_path / "ta")
    plain.update(method="task_arithmetic", parameters={"lambda": 1.0})
    for entry, label in zip(plain["adapters"], record["adapters"]):
        del entry["calibration"]
        entry["weight"] = [{"filter": name, "value": row[label]}
                           for name, row in sorted(record["coefficients"].items(), key=lambda kv: -len(kv[0]))]
        entry["weight"].append({"value": 0.0})
    assert weights_of(learned) == weights_of(run(plain, tmp_path))
    card = (learned / "README.md").read_text()
    assert "## Learned coefficients" in card and "coefficients.json" in card
    assert (learned / "coefficients.png").stat().st_size > 0 and (learned / "coefficients_loss.png").stat().st_size > 0


@pytest.mark.slow
def test_same_seed_gives_the_same_coefficients_and_bytes(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    def seeded(out: str) -> dict[str, Any]:
        data = learned_config(demo, tmp_path, tmp_path / out)
        data["seed"] = 3
        return data

    first = run(seeded("a"), tmp_path)
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "other_cache"))  # teachers recomputed, not read back
    second = run(seeded("b"), tmp_path)
    a = json.loads((first / "coefficients.json").read_text())
    b = json.loads((second / "coefficients.json").read_text())
    assert a["coefficients"] == b["coefficients"] and a["train_loss"] == b["train_loss"]
    assert weights_of(first) == weights_of(second)


@pytest.mark.slow
def test_held_out_loss_falls(demo: Path, tmp_path: Path) -> None:
    out = run(learned_config(demo, tmp_path, tmp_path / "m", steps=25, lr=0.05, holdout=0.2), tmp_path)
    held = json.loads((out / "coefficients.json").read_text())["held_out_loss"]
    assert held["after"] < held["before"], held
    assert held["prompts"] == {name: 4 for name in ADAPTERS}


@pytest.mark.slow
def test_teachers_are_cached_by_content(demo: Path, tmp_path: Path) -> None:
    from mergekit_lite.calibration import load_calibration

    config = MergeConfig.from_dict(learned_config(demo, tmp_path, tmp_path / "m"), tmp_path)
    with prepare(config) as prepared:
        calibration = load_calibration(prepared, seed=0, room=4, cache_dir=tmp_path / "teachers")
        first = calibration.teachers(max_new_tokens=4)
        assert len(list((tmp_path / "teachers").glob("*.pt"))) == len(ADAPTERS)
        again = load_calibration(prepared, seed=0, room=4, cache_dir=tmp_path / "teachers")
        with torch.no_grad():
            cached = again.teachers(max_new_tokens=4)
        assert [t.continuations for t in cached] == [t.continuations for t in first]
        assert len(list((tmp_path / "teachers").glob("*.pt"))) == len(ADAPTERS)  # read back, nothing new
        other_seed = load_calibration(prepared, seed=1, room=4, cache_dir=tmp_path / "teachers")
        other_seed.teachers(max_new_tokens=4)
        assert len(list((tmp_path / "teachers").glob("*.pt"))) == 2 * len(ADAPTERS)  # other prompts, other key


@pytest.mark.slow
def test_lambda_gradient_equals_finite_differences(bases: dict[str, Path], tmp_path: Path) -> None:
    """d loss / d λᵢ,ₜ by autograd through the branches = central differences, in float64, both losses.

    On tiny GPT-2 (Conv1D branches; its LayerNorm computes in float64, where Llama's RMSNorm rounds through
    float32 and would blur a finite difference)."""
    from evals.fixtures import build_adapter
    from mergekit_lite.calibration import load_calibration
    from mergekit_lite.calibration.fit import _adapter_mean, _batch_loss

    base = bases["gpt2"]
    calibration_dir = tmp_path / "calibration"
    adapters = [{"path": str(build_adapter(base, tmp_path / f"a{seed}", "lora", seed=seed)),
                 "calibration": str(calibration_file(calibration_dir, f"a{seed}", count=6))} for seed in (1, 2)]
    config = MergeConfig.from_dict({"base_model": str(base), "method": "learned", "adapters": adapters,
                                    "output": str(tmp_path / "o")}, tmp_path)
    with prepare(config) as prepared:
        calibration = load_calibration(prepared, seed=0, room=4, dtype=torch.float64)
    model = calibration.model
    teachers = calibration.teachers(max_new_tokens=4, log_probs=True)
    picked = [(a, j) for a in range(2) for j in range(3)]
    tokens = [len(teachers[a].continuations[j]) for a, j in picked]
    generator = torch.Generator().manual_seed(0)
    point = 0.5 + 0.5 * torch.rand(model.n_adapters, len(model.tensors), generator=generator, dtype=torch.float64)
    for loss in ("ce", "kl"):
        def value(coefficients: torch.Tensor, loss: str = loss) -> torch.Tensor:
            with model.using(coefficients):
                per_row, owners = _batch_loss(model, teachers, picked, loss)
            return _adapter_mean(per_row, owners, tokens)

        theta = point.clone().requires_grad_(True)
        value(theta).backward()
        assert theta.grad is not None
        for i, t in [(0, 0), (1, 1), (1, len(model.tensors) - 1), (0, len(model.tensors) // 2)]:
            step = torch.zeros_like(point)
            step[i, t] = 1e-6
            with torch.no_grad():
                numeric = (value(point + step) - value(point - step)) / 2e-6
            assert torch.isclose(theta.grad[i, t], numeric, rtol=1e-6, atol=1e-10), (loss, i, t, theta.grad[i, t], numeric)
    calibration.close()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "pattern", "rslora", "bias", "gpt2"])
def test_branches_are_each_adapter_exactly(variant: str, bases: dict[str, Path], tmp_path: Path) -> None:
    """Teacher i (base + branches at λ = one-hot i) gives the logits of PEFT's model for adapter i."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evals.fixtures import build_adapter
    from mergekit_lite.calibration.batches import pad
    from mergekit_lite.calibration.model import BranchedModel

    base = bases["gpt2" if variant == "gpt2" else "llama_bias" if variant == "bias" else "llama"]
    kind = "lora" if variant == "gpt2" else variant
    folders = [build_adapter(base, tmp_path / f"a{seed}", kind, seed=seed) for seed in (1, 2)]
    config = MergeConfig.from_dict({"base_model": str(base), "method": "task_arithmetic",
                                    "adapters": [{"path": str(f)} for f in folders], "output": str(tmp_path / "o")})
    with prepare(config) as prepared:
        model = BranchedModel(prepared, dtype=torch.float64)
    batch = pad([[3, 7, 11, 5, 9, 2], [4, 4, 8]], 0)
    for index, folder in enumerate(folders):
        with torch.no_grad(), model.teacher(index):
            ours = model.logits(batch)
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64),
                                              folder).eval()
        with torch.no_grad():
            theirs = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.attention_mask.bool()
        assert torch.allclose(ours[mask], theirs[mask], atol=1e-10), (ours - theirs).abs().max()


@pytest.mark.slow
def test_adapter_output_loads_in_peft_and_matches_the_checkpoint(demo: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = run(learned_config(demo, tmp_path, tmp_path / "ckpt", steps=3), tmp_path)
    data = learned_config(demo, tmp_path, tmp_path / "adapter", steps=3)
    data["output"]["format"] = "peft"
    adapter = run(data, tmp_path)
    assert json.loads((adapter / "coefficients.json").read_text())["coefficients"] == \
        json.loads((checkpoint / "coefficients.json").read_text())["coefficients"]
    ids = torch.tensor([[3, 7, 11, 5, 9, 2, 6]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo / "base", dtype=torch.float32),
                                         adapter).eval()(input_ids=ids).logits
    assert torch.allclose(merged, peft, atol=1e-4), (merged - peft).abs().max()
    assert "## Learned coefficients" in (adapter / "README.md").read_text()


def test_weight_filters_pick_each_tensor_exactly() -> None:
    """The per-tensor weights the engine evaluates: a name that is a substring of another still gets its own value."""
    from mergekit_lite.methods.gradients import evaluate
    from mergekit_lite.methods.learned import weight_filters

    names = ["h.1.attn.c_attn.weight", "h.11.attn.c_attn.weight", "embed.weight", "pos_embed.weight", "a.embed.weight"]
    filters = weight_filters(names, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert [evaluate(filters, n, 0.0) for n in names] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert evaluate(filters, "untouched.weight", 0.0) == 0.0


def test_dry_run_plans_the_linear_stream_without_calibrating(demo: Path, tmp_path: Path) -> None:
    from mergekit_lite.api import describe_plan

    config = MergeConfig.from_dict(learned_config(demo, tmp_path, tmp_path / "m"), tmp_path)
    text = describe_plan(config, device="cpu")
    assert "Learned coefficients (learned)" in text and "dry run: nothing written" in text
    assert not (tmp_path / "cache").exists()
    # what the calibration will do, said by the method: prompts per adapter, the teacher pass, the training
    for name in ADAPTERS:
        assert f"    '{name}': up to 64 prompt(s) from {tmp_path / 'calibration' / name}.jsonl (seed 0, 10% held out)" in text
    assert "teacher pass: each adapter alone answers its prompts greedily, ≤ 4 new token(s) each" in text
    with prepare(config) as prepared:
        tensors = len(prepared.plan.touched_by[0])  # every demo adapter touches the same 14 tensors
    assert (f"training: 4 Adam step(s) of 4 prompt(s) per adapter (lr 0.02, loss ce) on {3 * tensors} λ (3 adapter(s) × "
            f"{tensors}, granularity tensor) from λ⁰ = 0.5·wᵢ") in text
    layer = describe_plan(MergeConfig.from_dict(learned_config(demo, tmp_path, tmp_path / "m", granularity="layer",
                                                               init_method="task_arithmetic"), tmp_path), device="cpu")
    assert "on 6 λ (3 adapter(s) × 2, granularity layer) from task_arithmetic's coefficients" in layer
    assert "QR" not in text and "SVD" not in text


@pytest.mark.slow
def test_no_progress_keeps_stderr_to_our_lines(demo: Path, tmp_path: Path) -> None:
    """`--no-progress`: the calibration's model load shows no transformers bar ("Loading weights"); stdout is the
    summary line alone, and transformers' bar switch is as it was afterwards."""
    import yaml
    from click.testing import CliRunner
    from transformers.utils import logging as hf_logging

    from mergekit_lite.cli import main

    data = learned_config(demo, tmp_path, tmp_path / "m", steps=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    before = hf_logging.is_progress_bar_enabled()
    result = CliRunner().invoke(main, ["run", str(config), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert hf_logging.is_progress_bar_enabled() == before
    assert "Loading" not in result.stderr and "it/s" not in result.stderr and "%|" not in result.stderr, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "learned" in result.stdout, result.stdout


@pytest.mark.slow
def test_a_non_finite_loss_names_the_adapter_and_the_step(demo: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_lite.calibration import fit as fit_module
    from mergekit_lite.errors import NonFiniteError

    real = fit_module._batch_loss
    calls = {"n": 0}

    def poisoned(model: Any, sets: Any, picked: Any, loss: str) -> Any:
        per_row, owners = real(model, sets, picked, loss)
        calls["n"] += torch.is_grad_enabled()  # training steps only (the held-out passes run without grad)
        if torch.is_grad_enabled() and calls["n"] == 3:  # step 3 goes wrong on 'facts'
            per_row = per_row.clone()
            per_row[owners.index(1)] = float("nan")
        return per_row, owners

    monkeypatch.setattr(fit_module, "_batch_loss", poisoned)
    out = tmp_path / "m"
    with pytest.raises(NonFiniteError, match=r"step 3 on adapter 'facts'"):
        run(learned_config(demo, tmp_path, out), tmp_path)
    assert not out.exists()


@pytest.mark.slow
def test_dora_and_full_fine_tunes_are_refused_before_anything_is_written(bases: dict[str, Path], demo: Path,
                                                                          tmp_path: Path) -> None:
    from evals.fixtures import build_adapter
    from mergekit_lite.errors import MergeConfigError

    base = bases["llama"]
    prompts = str(calibration_file(tmp_path / "calibration", "p"))
    dora = build_adapter(base, tmp_path / "dora", "dora")
    plain = build_adapter(base, tmp_path / "plain", "lora", seed=2)
    out = tmp_path / "out"
    config = {"base_model": str(base), "method": "learned", "output": str(out),
              "adapters": [{"path": str(plain), "calibration": prompts}, {"path": str(dora), "calibration": prompts}]}
    with pytest.raises(MergeConfigError, match="adapter 'dora'.*DoRA"):
        run(config, tmp_path)
    assert not out.exists()
    full = {"base_model": str(demo / "base"), "method": "learned", "output": str(out),
            "adapters": [{"path": str(demo / "adapters" / "style"), "calibration": prompts}],
            "models": [{"path": str(demo / "base"), "calibration": prompts}]}
    with pytest.raises(MergeConfigError, match="full fine-tune"):
        run(full, tmp_path)
    assert not out.exists()


@pytest.mark.slow
def test_in_memory_merge_calibrates_first_and_matches_the_written_checkpoint(demo: Path, tmp_path: Path) -> None:
    """`merge sweep`'s in-memory path never streams a data-aware method uncalibrated (its init λ)."""
    from safetensors.torch import load_file

    from mergekit_lite.sweep.memory import merged_tensors

    data = learned_config(demo, tmp_path, tmp_path / "m", steps=3)
    written = load_file(run(data, tmp_path) / "model.safetensors")
    with prepare(MergeConfig.from_dict(data, tmp_path)) as prepared:
        in_memory = merged_tensors(prepared, torch.device("cpu"))
    assert in_memory and all(torch.equal(value, written[name]) for name, value in in_memory.items())


def test_granularity_shares_one_lambda_per_adapter_tensor_layer_or_adapter() -> None:
    from types import SimpleNamespace

    from mergekit_lite.calibration.fit import groups

    model = SimpleNamespace(n_adapters=2, tensors=["model.layers.0.q.weight", "model.layers.0.v.weight",
                                                    "model.layers.1.q.weight", "lm_head.weight"])
    assert groups(model, "tensor").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups(model, "layer").tolist() == [[0, 0, 1, 2], [3, 3, 4, 5]]
    assert groups(model, "adapter").tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("calibration, expected", [
    ("data/capitals/train.jsonl", None),
    ("data/capitals/validation.jsonl", "is also the data the sweep scores"),
    ("data/capitals/test.jsonl", "is also the data the sweep scores"),
    ("capitals", "calibration task 'capitals' is one the sweep scores"),
])
def test_a_sweep_never_calibrates_on_what_it_scores(calibration: str, expected: str | None, tmp_path: Path) -> None:
    from mergekit_lite.errors import MergeConfigError
    from mergekit_lite.evaluation.lm_eval_runner import SUITE_DIR
    from mergekit_lite.sweep.spec import sweep_config_from_dict

    source = calibration if "/" not in calibration else str(SUITE_DIR / calibration)
    data = {"base_model": str(SUITE_DIR / "base"),
            "adapters": [{"path": str(SUITE_DIR / "adapters" / "capitals"), "calibration": source,
                          "calibration_template": "Q: {{question}}\nA:"}],
            "sweep": {"method": ["learned"], "parameters": {"steps": [0, 20]}},
            "eval": {"tasks": ["capitals"]}}
    if expected is None:
        sweep_config_from_dict(data, tmp_path)
    else:
        with pytest.raises(MergeConfigError, match=expected):
            sweep_config_from_dict(data, tmp_path)
