"""Weight quantization formats, each run by its home library's own reference code: never a look-alike of ours.

GGUF types (q8_0, q4_0, ...) use the `gguf` package's numpy quantizers (llama.cpp's Python side, the code its
converter runs); blocks run along each row, so a row range quantizes the same alone or within the whole
tensor. bitsandbytes' NF4 / FP4 (blockwise over the flattened tensor, blocksize 64, as `Linear4bit` stores a
weight) and LLM.int8 (`Linear8bitLt`: row-wise absmax of the weight cast to float16) run through
`bitsandbytes.functional`. A format whose library is missing, or that its library cannot quantize (GGUF
K-quants: the gguf package only dequantizes them), is refused by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..errors import InputError
from ..suggest import did_you_mean


class QuantizeUnavailable(InputError):
    """A quantization format that is unknown here, or whose library is missing or cannot produce it (exit 2)."""


@dataclass(frozen=True)
class QuantFormat:
    """One format: its name as its home library spells it, the library, and how its blocks tile a tensor."""

    name: str
    library: str
    #: entries per quantization block
    block: int
    #: True when blocks run over the flattened tensor (bitsandbytes 4-bit), False when along each row
    flat: bool
    #: the typical rounding step is a block's absmax / levels (q8_0: 127, q4_0: 8, nf4 ~7.5: 16 uneven codes in [-1, 1])
    levels: float
    #: dequantize(quantize(rows)) as float32; set by `resolve`
    roundtrip: Callable[[torch.Tensor], torch.Tensor]

    def unfit(self, shape: Sequence[int]) -> str | None:
        """Why a tensor of `shape` cannot be quantized to this format, or None when it can."""
        if len(shape) != 2:
            return f"{len(shape)}-D (only matrices are quantized)"
        if shape[1] % self.block:
            # bitsandbytes' blocks run over the flattened tensor, but its CPU dequantizer counts them per row,
            # so the two disagree on such rows: measured only where every row holds whole blocks
            return f"row length {shape[1]} is not a multiple of {self.name}'s block of {self.block}"
        return None

    def row_multiple(self, cols: int) -> int:
        """Rows per aligned step: a chunk of a multiple of this many rows starts and ends on block boundaries."""
        if not self.flat:
            return 1
        return self.block // math.gcd(cols, self.block)


#: GGUF types the gguf package quantizes (its `quantize_blocks`), by llama.cpp's lower-case name, with the levels
_GGUF = {"q8_0": 127.0, "q5_0": 16.0, "q5_1": 31.0, "q4_0": 8.0, "q4_1": 15.0}
#: GGUF types the gguf package can only dequantize: refused with the tool that makes them
_GGUF_DEQUANT_ONLY = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q3_k_m",
                      "q3_k_s", "q3_k_l", "iq4_nl", "iq4_xs")
#: bitsandbytes formats: NF4 / FP4 as Linear4bit stores weights (blocksize 64), LLM.int8 as Linear8bitLt does
_BNB_4BIT = {"nf4": 7.5, "fp4": 6.0}
BNB_BLOCKSIZE = 64
FORMATS = (*_GGUF, *_BNB_4BIT, "int8")


def resolve(names: str | Sequence[str]) -> list[QuantFormat]:
    """The formats a comma-separated list (or a sequence) names, in order, each checked to run here."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n]
    if not items:
        raise QuantizeUnavailable(f"--quantize: name at least one format ({', '.join(FORMATS)})")
    return [format_of(name) for name in dict.fromkeys(items)]


def format_of(name: str) -> QuantFormat:
    """One format by name (case-insensitive), or QuantizeUnavailable saying why it cannot run."""
    key = name.lower()
    if key in _GGUF:
        return _gguf_format(key)
    if key in _BNB_4BIT or key == "int8":
        return _bnb_format(key)
    if key in _GGUF_DEQUANT_ONLY:
        raise QuantizeUnavailable(
            f"--quantize {name}: the gguf package has no reference quantizer for K-/IQ-quants (it only dequantizes "
            f"them; llama.cpp's llama-quantize makes them), so it is refused rather than imitated; use one of "
            f"{', '.join(FORMATS)}")
    raise QuantizeUnavailable(f"--quantize {name}: unknown format{did_you_mean(key, FORMATS + _GGUF_DEQUANT_ONLY, matches=3)}")


@cache
def _gguf_format(name: str) -> QuantFormat:
    try:
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.quants import dequantize, quantize
    except ImportError:
        raise QuantizeUnavailable(f"--quantize {name}: needs the gguf package, which is not installed "
                                  "(pip install 'mergekit_lite[quantize]')") from None
    qtype = GGMLQuantizationType[name.upper()]
    block = GGML_QUANT_SIZES[qtype][0]

    def roundtrip(rows: torch.Tensor) -> torch.Tensor:
        # llama.cpp's converter widens bf16/f16 weights to float32 exactly, then quantizes row blocks
        array = np.ascontiguousarray(rows.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(dequantize(quantize(array, qtype), qtype), dtype=np.float32))

    return QuantFormat(name, "gguf", block, False, _GGUF[name], roundtrip)


@cache
def _bnb_format(name: str) -> QuantFormat:
    functional = _bitsandbytes(name)
    if name == "int8":
        def roundtrip(rows: torch.Tensor) -> torch.Tensor:
            # Int8Params: the weight cast to float16, then row-wise absmax int8 (CB) with row scales (SCB)
            quantized, scales, _ = functional.int8_vectorwise_quant(rows.detach().to("cpu", torch.float16))
            return functional.int8_vectorwise_dequant(quantized, scales).to(torch.float32)

        return QuantFormat(name, "bitsandbytes", 1, False, 127.0, roundtrip)

    def roundtrip4(rows: torch.Tensor) -> torch.Tensor:
        # Params4bit: the weight in its own dtype, quantized blockwise over the flattened tensor
        weight = rows.detach().to("cpu").contiguous()
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.float()
        packed, state = functional.quantize_4bit(weight, blocksize=BNB_BLOCKSIZE, quant_type=name)
        return functional.dequantize_4bit(packed, state).to(torch.float32)

    return QuantFormat(name, "bitsandbytes", BNB_BLOCKSIZE, True, _BNB_4BIT[name], roundtrip4)


@cache
def _bitsandbytes(name: str):  # type: ignore[no-untyped-def]
    """bitsandbytes.functional, imported with its CPU-kernel warnings kept quiet; refused when it cannot run."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    except Exception as error:  # ImportError, or a native library that fails to load on this machine
        raise QuantizeUnavailable(
            f"--quantize {name}: needs bitsandbytes, which is {'not installed' if isinstance(error, ImportError) else 'unusable here'}"
            f" ({type(error).__name__}: {str(error)[:120]}); pip install 'mergekit_lite[quantize]'") from None
    finally:
        quiet.setLevel(level)
    try:  # a backend that imports but cannot run on this CPU is as good as missing
        probe = torch.linspace(-1, 1, 128).reshape(2, 64)
        functional.quantize_4bit(probe, blocksize=BNB_BLOCKSIZE, quant_type="nf4")
        functional.int8_vectorwise_quant(probe.half())
    except Exception as error:
        raise QuantizeUnavailable(f"--quantize {name}: bitsandbytes is installed but cannot quantize on this "
                                  f"machine ({type(error).__name__}: {str(error)[:120]})") from None
    return functional
