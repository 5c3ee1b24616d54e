"""Merge, then quantize: how much of a merge's change survives q8_0 / q4_0 / NF4 / int8 (`merge verify --quantize`)."""

from .formats import FORMATS, QuantFormat, QuantizeUnavailable, format_of, resolve
from .measure import Figures, aligned_chunk_rows, measure_tensor

__all__ = ["FORMATS", "Figures", "QuantFormat", "QuantizeUnavailable", "aligned_chunk_rows", "format_of",
           "measure_tensor", "resolve"]
