"""Our output against mergekit 0.1.5's on the same mergekit configs (linear, task_arithmetic, ties, slerp, …).

Builds the tiny models of merge_configs/mergekit/ into a scratch folder, runs each config through mergekit's
`mergekit-yaml` (from the scratch venv benchmarks/work/peers-venv, where mergekit 0.1.5 is installed) and through
`merge run` (which converts it, keeping mergekit's result where a parameter of ours can), and reports per config
the largest difference per tensor, in units of one step of the output dtype at that tensor's largest magnitude,
and the share of entries that differ at all. Writes benchmarks/results/mergekit_compat.{md,json}.

    .venv/bin/python benchmarks/mergekit_compat.py [--configs ties.yml slerp.yml ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEERS = REPO / "benchmarks" / "work" / "peers-venv" / "bin"
CORPUS = REPO / "merge_configs" / "mergekit"
RESULTS = REPO / "benchmarks" / "results"
#: mantissa bits of each output dtype: one step at magnitude m is m · 2^-bits
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
DEFAULT = ("linear.yml", "linear_with_base.yml", "task_arithmetic.yml", "ties.yml", "ties_bf16.yml",
           "ties_gradient.yml", "ties_lora.yml", "slerp.yml", "slerp_scalar.yml", "dare_linear.yml", "dare_ties.yml")


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _absolute(data: Any, folder: Path) -> Any:
    """A mergekit config with every model reference (`x`, `x+lora`) made an absolute path under `folder`."""
    def path(reference: str) -> str:
        return "+".join(str(folder / part) for part in reference.split("+"))
    data = dict(data)
    if "base_model" in data:
        data["base_model"] = path(data["base_model"])
    data["models"] = [{**m, "model": path(m["model"])} for m in data["models"]]
    return data


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest |ours − theirs| in steps of the output dtype at each tensor's largest |value|; share of differing
    entries; relative Frobenius difference of the whole model."""
    worst_steps, differing, total, diff_sq, norm_sq = 0.0, 0, 0, 0.0, 0.0
    for name, mine in ours.items():
        other = theirs[name]
        step = float(other.abs().max()) * 2.0 ** -MANTISSA[mine.dtype] or 1.0
        delta = (mine.double() - other.double()).abs()
        worst_steps = max(worst_steps, float(delta.max()) / step)
        differing += int((delta > 0).sum())
        total += delta.numel()
        diff_sq += float((delta ** 2).sum())
        norm_sq += float((other.double() ** 2).sum())
    return {"max_steps": worst_steps, "differing_share": differing / total, "relative_frobenius": (diff_sq / norm_sq) ** 0.5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT))
    args = parser.parse_args(argv)
    from evals.full_models import build_corpus_models

    version = subprocess.run([str(PEERS / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="mergekit-compat-") as scratch:
        folder = Path(scratch)
        shutil.copytree(CORPUS, folder, dirs_exist_ok=True)
        build_corpus_models(folder)
        for name in args.configs:
            theirs, ours = folder / f"mergekit-{name}", folder / f"ours-{name}"
            absolute = folder / f"absolute-{name}"  # mergekit takes a relative name for a Hub id: give it paths
            absolute.write_text(yaml.safe_dump(_absolute(yaml.safe_load((folder / name).read_text()), folder)))
            run = subprocess.run([str(PEERS / "mergekit-yaml"), str(absolute), str(theirs), "--lora-merge-cache",
                                  str(folder / "lora-cache"), "--no-copy-tokenizer"],
                                 cwd=folder, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                rows.append({"config": name, "error": f"mergekit: {run.stderr.strip().splitlines()[-1:]}"})
                continue
            mine = subprocess.run([str(REPO / ".venv" / "bin" / "merge"), "run", name, "--out", str(ours),
                                   "--no-progress"], cwd=folder, env=env, capture_output=True, text=True)
            if mine.returncode != 0:
                rows.append({"config": name, "error": f"ours: {mine.stderr.strip()}"})
                continue
            differences = [line.split("mergekit difference: ", 1)[1] for line in mine.stderr.splitlines()
                           if "mergekit difference: " in line]
            result = compare(_load(ours), _load(theirs))
            rows.append({"config": name, **result, "reported_differences": differences})
            print(f"{name:22s} max {result['max_steps']:.2f} steps, {100 * result['differing_share']:.2f}% entries "
                  f"differ, rel. Frobenius {result['relative_frobenius']:.2e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mergekit_compat.json").write_text(json.dumps({"mergekit": version, "rows": rows}, indent=2))
    lines = [f"# Ours vs mergekit {version} on merge_configs/mergekit/ (tiny models)", "",
             "max steps: the largest |ours − mergekit| of a tensor in steps of the output dtype at that tensor's "
             "largest magnitude (1.0 = one rounding step). DARE configs differ by their random masks by design.", "",
             "| config | max steps | entries that differ | relative Frobenius | differences `merge` reports |",
             "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | error | | | {row['error']} |")
            continue
        reported = "; ".join(d.split(":")[0] for d in row["reported_differences"]) or "none"
        lines.append(f"| {row['config']} | {row['max_steps']:.2f} | {100 * row['differing_share']:.2f}% | "
                     f"{row['relative_frobenius']:.2e} | {reported} |")
    (RESULTS / "mergekit_compat.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
