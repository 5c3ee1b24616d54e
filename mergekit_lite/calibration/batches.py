"""Prompts → token ids → padded batches with a padding mask.

Prompts are tokenized as the tokenizer encodes text by default (with its BOS for Llama-style tokenizers), as lm-eval
reads a causal model's context and as the suite's adapters were trained: the merged model is calibrated on the
token sequences it will be scored on. A prompt longer than the context is cut from the left (its end, where the
answer starts, is what matters; the leading special tokens stay); one log line says how many were cut.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenBatch:
    """Sequences of one batch, padded: `input_ids` and `attention_mask` (1 = token, 0 = padding), both b×T."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        """Each sequence's real length."""
        return [int(n) for n in self.attention_mask.sum(dim=1)]

    def to(self, device: torch.device) -> TokenBatch:
        """The batch on `device`."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


def encode(tokenizer: Any, prompts: Sequence[str], max_length: int, where: str, room: int = 0) -> list[list[int]]:
    """Token ids of each prompt, cut from the left to leave `room` tokens (the continuation) in `max_length`."""
    keep = max_length - room
    if keep < 1:
        raise InputError(f"{where}: the model's context ({max_length} tokens) leaves no room for a prompt and "
                         f"{room} generated tokens; lower max_new_tokens")
    encoded, cut = [], 0
    for prompt in prompts:
        plain = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(prompt)["input_ids"])
        if not plain:
            raise InputError(f"{where}: prompt {prompt[:40]!r} tokenizes to nothing; remove empty prompts")
        prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
        if len(prefix) + len(plain) > keep:
            plain, cut = plain[len(prefix) + len(plain) - keep:], cut + 1
        encoded.append(prefix + plain)
    if cut:
        logger.warning("%s: %d of %d prompts were longer than %d tokens and were cut from the left", where, cut,
                       len(prompts), keep)
    return encoded


def pad(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> TokenBatch:
    """One batch of `sequences`, padded with `pad_id` on `side` ("left" for generation, "right" for scoring)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return TokenBatch(ids, mask)


def chunks(count: int, size: int) -> Iterator[range]:
    """Index ranges of `size` (the last one shorter) covering `count` items in order."""
    for start in range(0, count, size):
        yield range(start, min(count, start + size))
