"""What survives quantization when the merged change is near the quantization step: synthetic low-rank ΔW.

    python evals/quantize_near_step.py                      # 2048 x 2048, the README's table
    python evals/quantize_near_step.py --size 256 --formats q8_0,q4_0

The suite's adapters are 0.4-0.6 of ‖W‖, far above every step; real LoRA changes are 10⁻³-10⁻² of ‖W‖. Here W is
a Gaussian weight (std 0.02, bf16, off any grid) and ΔW a rank-8 product scaled to a set of ‖ΔW‖/‖W‖; each row
of the table is `measure_tensor` (the same code as `merge verify --quantize`) on W and the bf16 merged weight.
"ΔW / step" is RMS(ΔW) over the format's mean rounding step (a block's absmax / its levels).
"""

from __future__ import annotations

import argparse

import torch

from mergekit_lite.quantize import format_of, measure_tensor

RELATIVE = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)


def table(size: int, formats: list[str], rank: int = 8, seed: int = 0) -> list[str]:
    """The markdown table: per ‖ΔW‖/‖W‖ and format, ΔW/step, share, cosine, error."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, size, generator=generator) * 0.02).to(torch.bfloat16)
    direction = torch.randn(size, rank, generator=generator) @ torch.randn(rank, size, generator=generator)
    direction /= direction.norm()
    chosen = [format_of(name) for name in formats]
    steps = {f.name: float(base.float().reshape(-1, f.block).abs().amax(dim=1).mean()) / f.levels for f in chosen}
    lines = ["| ‖ΔW‖/‖W‖ | " + " | ".join(f"{f} ΔW/step · share · cosine · error" for f in formats) + " |",
             "|---|" + "---|" * len(formats)]
    for relative in RELATIVE:
        delta = direction * relative * float(base.float().norm())
        merged = (base.double() + delta.double()).to(torch.bfloat16)
        exact = merged.double() - base.double()  # what the bf16 merged weight holds of ΔW
        figures = measure_tensor(lambda a, b: base[a:b], lambda a, b: merged[a:b], base.shape, chosen)
        rms = float(exact.square().mean().sqrt())
        cells = [f"{rms / steps[f]:.2g} · {figures[f].share:.3f} · {figures[f].cosine:.3f} · {figures[f].error:.3g}"
                 for f in formats]
        lines.append(f"| {relative:g} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="rows and columns of W (a multiple of 64)")
    parser.add_argument("--formats", default="q8_0,q4_0,nf4")
    args = parser.parse_args()
    print("\n".join(table(args.size, [f.strip() for f in args.formats.split(",")])))


if __name__ == "__main__":
    main()
