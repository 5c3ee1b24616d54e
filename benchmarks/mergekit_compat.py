"""Our output against mergekit 0.1.5's on the same mergekit configs (linear, task_arithmetic, ties, slerp, …).

Builds the tiny models of merge_configs/mergekit/ into a scratch folder, runs each config through mergekit's
`mergekit-yaml` (`mergekit-multi` for a mega file of several documents; from a scratch venv where mergekit 0.1.5
is installed, benchmarks/work/peers-venv unless --peers names another bin folder) and through `merge run` (which
converts it, keeping mergekit's result where a parameter of ours can), and reports per config (per document of a
mega file) the largest difference per tensor, in units of one step of the output dtype at that tensor's largest
magnitude, and the share of entries that differ at all. Writes benchmarks/results/mergekit_compat.{md,json}.

    .venv/bin/python benchmarks/mergekit_compat.py [--peers /tmp/mk/bin] [--configs ties.yml slerp.yml ...]
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
           "ties_gradient.yml", "ties_lora.yml", "slerp.yml", "slerp_scalar.yml", "dare_linear.yml", "dare_ties.yml",
           "gradient-slerp.yml", "slerp_two_slices.yml", "mega.yml", "nuslerp.yml", "nuslerp_base.yml",
           "multislerp.yml", "karcher.yml", "sce.yml", "sce_select.yml", "nearswap.yml", "ram.yml", "ramplus_tl.yml")


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _absolute(data: Any, folder: Path, names: frozenset[str] = frozenset()) -> Any:
    """A mergekit config with every model reference (`x`, `x+lora`) made an absolute path under `folder`, in
    `models:` and in `slices:`; a reference to a document of the same mega file (in `names`) is kept as it is."""
    def path(reference: str) -> str:
        if reference in names:
            return reference
        return "+".join(str(folder / part) for part in reference.split("+"))
    data = dict(data)
    if "base_model" in data:
        data["base_model"] = path(data["base_model"])
    if "models" in data:
        data["models"] = [{**m, "model": path(m["model"])} for m in data["models"]]
    if "slices" in data:
        data["slices"] = [{**piece, "sources": [{**source, "model": path(source["model"])}
                                                for source in piece["sources"]]} for piece in data["slices"]]
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


def _run_config(name: str, folder: Path, peers: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Run one corpus config through mergekit and through `merge run`; one row per output (per document of a
    mega file, `config: document`)."""
    documents = list(yaml.safe_load_all((folder / name).read_text()))
    names = frozenset(d["name"] for d in documents if d.get("name"))
    absolute = folder / f"absolute-{name}"  # mergekit takes a relative name for a Hub id: give it paths
    absolute.write_text(yaml.safe_dump_all([_absolute(d, folder, names) for d in documents]))
    theirs, ours = folder / f"mergekit-{name}", folder / f"ours-{name}"
    if len(documents) > 1:  # mega: each named document is written to <intermediate-dir>/<name>
        command = [str(peers / "mergekit-multi"), str(absolute), "--intermediate-dir", str(theirs)]
        outputs = [(f"{name}: {d['name']}", folder / d["name"], theirs / d["name"])
                   for d in documents if d.get("name")]
        mine_command = ["run", name, "--no-progress"]  # ours writes each named document to <folder>/<name>
    else:
        command = [str(peers / "mergekit-yaml"), str(absolute), str(theirs), "--lora-merge-cache",
                   str(folder / "lora-cache")]
        outputs = [(name, ours, theirs)]
        mine_command = ["run", name, "--out", str(ours), "--no-progress"]
    run = subprocess.run(command + ["--no-copy-tokenizer"], cwd=folder, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return [{"config": name, "error": f"mergekit: {run.stderr.strip().splitlines()[-1:]}"}]
    mine = subprocess.run([str(REPO / ".venv" / "bin" / "merge"), *mine_command], cwd=folder, env=env,
                          capture_output=True, text=True)
    if mine.returncode != 0:
        return [{"config": name, "error": f"ours: {mine.stderr.strip()}"}]
    differences = [line.split("mergekit difference: ", 1)[1] for line in mine.stderr.splitlines()
                   if "mergekit difference: " in line]
    rows = []
    for label, our_folder, their_folder in outputs:
        result = compare(_load(our_folder), _load(their_folder))
        rows.append({"config": label, **result, "reported_differences": differences})
        print(f"{label:40s} max {result['max_steps']:.2f} steps, {100 * result['differing_share']:.2f}% entries "
              f"differ, rel. Frobenius {result['relative_frobenius']:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT))
    parser.add_argument("--peers", type=Path, default=PEERS,
                        help="bin folder of a venv with mergekit 0.1.5 (default benchmarks/work/peers-venv/bin)")
    args = parser.parse_args(argv)
    from evals.full_models import build_corpus_models

    peers: Path = args.peers
    version = subprocess.run([str(peers / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="mergekit-compat-") as scratch:
        folder = Path(scratch)
        shutil.copytree(CORPUS, folder, dirs_exist_ok=True)
        build_corpus_models(folder)
        for name in args.configs:
            rows.extend(_run_config(name, folder, peers, env))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mergekit_compat.json").write_text(json.dumps({"mergekit": version, "rows": rows}, indent=2))
    lines = [f"# Ours vs mergekit {version} on merge_configs/mergekit/ (tiny models)", "",
             "max steps: the largest |ours − mergekit| of a tensor in steps of the output dtype at that tensor's "
             "largest magnitude (1.0 = one rounding step). DARE configs differ by their random masks by design "
             "(mergekit draws them from torch's unseeded global RNG: their figures change from run to run). "
             "mega.yml runs through `mergekit-multi`, one row per document.", "",
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
