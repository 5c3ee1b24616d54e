"""`merge verify OUT_DIR`: re-check a finished checkpoint and print one line per check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from ..evaluation.logit_check import RELATIVE_TOLERANCE
from ..formats.safetensors import DTYPES
from .errors import friendly_errors

#: the default tolerance factor of each dtype a merge may write, by its config name (float32 1e-4, ...)
_DEFAULTS = ", ".join(f"{d.config_name} {RELATIVE_TOLERANCE[code]:g}" for code, d in DTYPES.items() if d.config_name)


def _finite(ctx: Any, param: Any, value: float | None) -> float | None:
    """click's FloatRange lets nan (no comparison fails) and inf through; a tolerance must be a number."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.command(name="verify")
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--base", default=None, help="Base model (folder or Hub id) for the logit check; needs --adapter.")
@click.option("--adapter", default=None, help="The one adapter merged into OUT_DIR (folder or Hub id), for the logit check.")
@click.option("--against-inputs", is_flag=True,
              help="Take --base and --adapter from OUT_DIR/mergekit_lite_config.yaml (one adapter at weight 1).")
@click.option("--atol", type=click.FloatRange(min=0), default=None, callback=_finite,
              help=f"Max |logit difference| allowed. Default: the largest |logit| times a factor set by the stored "
                   f"dtype ({_DEFAULTS}).")
@click.option("--checkpoint", default=None,
              help="For an adapter output (format: peft): the checkpoint merge of the same config; with --base, "
                   "base + the adapter must give its logits.")
@click.option("--quantize", "quantize", default=None, metavar="FORMATS",
              help="Measure what of the merge survives quantization instead: comma-separated formats as their "
                   "libraries name them (q8_0, q5_1, q5_0, q4_1, q4_0 from gguf; nf4, fp4, int8 from bitsandbytes). "
                   "W comes from --base (default: the base the merge's config names). With the logit check "
                   "(--adapter, --against-inputs or --checkpoint), adds a quantized column to it instead: the merged "
                   "model's Linear weights quantized against base+adapter unmerged, beside the base's own drift. "
                   "Needs `pip install 'mergekit_lite[quantize]'`.")
@click.option("--report", default=None, type=click.Path(file_okay=False),
              help="With --quantize: write quantize.md, quantize.json and quantize.png into this new or empty folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar of the NaN/Inf scan.")
@friendly_errors
def verify_command(out_dir: str, base: str | None, adapter: str | None, against_inputs: bool, atol: float | None,
                   checkpoint: str | None, quantize: str | None, report: str | None, no_progress: bool) -> None:
    """Check OUT_DIR (the output of `merge run`): exit 0 when every check passes, 1 on a fault, 2 if no checkpoint.

    Checks that the index and the shards agree, that every shard is complete with a sane header, that
    config.json parses and that no floating tensor holds NaN or Inf (streamed, a chunk at a time). With
    --base and --adapter (or --against-inputs), also loads the merged model and base + adapter through PEFT
    (unmerged, float32, CPU; needs `pip install 'mergekit_lite[verify]'`) and compares their logits.

    An adapter output (format: peft) gets the adapter checks instead: its safetensors file, its LoRA config
    and factor pairs, finite factors; with --base and --checkpoint, base + this adapter through PEFT against
    the checkpoint merge's logits.

    With --quantize FORMATS, measures instead, tensor by tensor, how much of the merge's change ΔW survives
    quantization of the merged weight (share, cosine, rounding error), per layer and module, with a verdict.
    With --quantize and the logit check, runs the logit check, then per format the merged model with its
    Linear weights quantized, Q(W+ΔW), against base + adapter unmerged, the base's own drift Q(W) vs W as the
    reference, and the adapter served unmerged on the quantized base: one table, one verdict line.
    """
    from ..errors import InputError
    from ..evaluation.verify import verify_checkpoint

    folder = Path(out_dir)
    logit_check = bool(adapter or against_inputs or checkpoint)
    formats = None
    if quantize is not None and logit_check:
        if report is not None:
            raise InputError("--report goes with --quantize and --base alone (the tensor survival report); "
                             "the quantized logit check prints its table")
        from ..quantize.formats import resolve

        formats = resolve(quantize)  # an unknown or unavailable format is refused before any model loads
    elif quantize is not None or report is not None:
        if quantize is None:
            raise InputError("--report goes with --quantize FORMATS")
        if atol is not None:
            raise InputError("--atol goes with the logit check (--adapter, --against-inputs or --checkpoint)")
        from ..quantize.command import quantize_report

        for line in quantize_report(folder, quantize, base, report, progress=not no_progress):
            click.echo(line)
        return
    if against_inputs:
        if base or adapter:
            raise InputError("give either --against-inputs or --base/--adapter, not both")
        from ..evaluation.logit_check import recorded_inputs

        base, adapter = recorded_inputs(folder)
    pair = _quantized_pair(folder, base, adapter, checkpoint) if formats is not None else None
    report = verify_checkpoint(folder, base=base, adapter=adapter, atol=atol, progress=not no_progress,
                               checkpoint=checkpoint)
    for line in report.lines():
        click.echo(line)
    report.raise_for_faults()
    if formats is not None and pair is not None:
        from ..evaluation.logit_check import quantized_logits

        for line in quantized_logits(pair[0], base or "", pair[1], formats).lines():
            click.echo(line)
    click.echo(f"{folder}: all {len(report.checks)} checks ok")


def _quantized_pair(folder: Path, base: str | None, adapter: str | None,
                    checkpoint: str | None) -> tuple[Path, str]:
    """(merged checkpoint, adapter) for the quantized logit check, refused before any check runs when incomplete."""
    from ..errors import InputError
    from ..formats.peft import is_adapter_folder

    if folder.is_dir() and is_adapter_folder(folder):
        merged, one = (Path(checkpoint) if checkpoint else None), str(folder)
    else:
        merged, one = folder, adapter
    if base is None or merged is None or one is None:
        raise InputError("--quantize with the logit check needs --base and --adapter (or --against-inputs; for "
                         "an adapter output, --base and --checkpoint)")
    return merged, one
