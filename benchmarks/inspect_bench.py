"""`merge inspect` beside our task_arithmetic `merge run` on the 492M synthetic base with 3 rank-16 adapters.

    python benchmarks/inspect_bench.py                 # exact conflicts, and --sample 1000000, 1 repeat
    python benchmarks/inspect_bench.py --repeats 3

Each case is its own process under /usr/bin/time (wall, peak RSS), as benchmarks/run.py measures; the cases
alternate, the table gives medians. The conflict share is conflicts_s over the measured parts of inspect.json's
timings (seconds summed over inspect's worker threads). Results: benchmarks/results/inspect_492M.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import RESULTS, WORK, machine, our_config, timed  # noqa: E402
from synthetic import Shape, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sample", type=int, default=1_000_000, help="entries per tensor for the sampled case")
    args = parser.parse_args()
    shape = Shape(2048, 5632, 8, 32000)
    root = build(WORK / "synthetic_h2048_l8_v32000", shape, 3, 16)  # reused when present
    merge = str(Path(sys.executable).with_name("merge"))
    out = WORK / "out"
    inspect_config = WORK / "inspect_492M.yaml"
    inspect_config.write_text(yaml.safe_dump({
        "base_model": str(root / "base"), "adapters": [{"path": str(root / f"adapter_{i}")} for i in range(3)]}))
    cases = {
        "merge run task_arithmetic": ([merge, "run", str(our_config(root, "task_arithmetic", out / "ours_task_arithmetic", 3)),
                                       "--no-progress", "--device", "cpu"], out / "ours_task_arithmetic"),
        "merge inspect (exact)": ([merge, "inspect", str(inspect_config), "--out", str(out / "inspect_exact"),
                                   "--no-progress", "--device", "cpu"], out / "inspect_exact"),
        f"merge inspect --sample {args.sample}": ([merge, "inspect", str(inspect_config), "--out",
                                                   str(out / "inspect_sampled"), "--no-progress", "--device", "cpu",
                                                   "--sample", str(args.sample)], out / "inspect_sampled"),
        "merge inspect --no-plots (exact)": ([merge, "inspect", str(inspect_config), "--out",
                                              str(out / "inspect_noplots"), "--no-progress", "--device", "cpu",
                                              "--no-plots"], out / "inspect_noplots"),
    }
    runs: dict[str, list[dict]] = {label: [] for label in cases}
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        for label, (command, folder) in cases.items():
            if label.startswith("merge run"):
                shutil.rmtree(folder, ignore_errors=True)
            result = timed(command, logs / f"{label.replace(' ', '_').replace('/', '_')}.{repeat}.log")
            if not label.startswith("merge run"):
                timings = json.loads((folder / "inspect.json").read_text())["timings"]
                parts = timings["geometry_s"] + timings["base_norms_s"] + timings["conflicts_s"]
                result["timings"] = timings
                result["conflict_share"] = timings["conflicts_s"] / parts if parts else None
                result["conflict_rate"] = json.loads((folder / "inspect.json").read_text())["conflicts"]["rate"]
            runs[label].append(result)
            print(f"[{repeat}] {label}: {result['wall_s']:.1f} s, {result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    baseline = statistics.median(r["wall_s"] for r in runs["merge run task_arithmetic"])
    summary = {}
    for label, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        summary[label] = {"median_wall_s": wall, "vs_task_arithmetic": wall / baseline,
                          "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results), "runs": results}
        shares = [r["conflict_share"] for r in results if r.get("conflict_share") is not None]
        if shares:
            summary[label]["conflict_share"] = statistics.median(shares)
            summary[label]["conflict_rate"] = results[-1]["conflict_rate"]
    report = {"shape": vars(shape) | {"parameters": shape.parameters()}, "adapters": 3, "rank": 16,
              "repeats": args.repeats, "machine": machine(), "results": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inspect_492M.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"492M-parameter bf16 Llama-shaped base, 3 rank-16 adapters on all linear layers; {machine()}; "
             f"median of {args.repeats} run(s).", "",
             "| case | wall | × task_arithmetic run | peak RSS | conflict share of inspect's work | conflict rate |",
             "|---|---|---|---|---|---|"]
    for label, row in summary.items():
        share = f"{row['conflict_share']:.0%}" if "conflict_share" in row else ""
        rate = f"{row['conflict_rate']:.1%}" if row.get("conflict_rate") is not None else ""
        lines.append(f"| {label} | {row['median_wall_s']:.1f} s | {row['vs_task_arithmetic']:.2f} | "
                     f"{row['peak_rss_bytes'] / 1e9:.2f} GB | {share} | {rate} |")
    (RESULTS / "inspect_492M.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
