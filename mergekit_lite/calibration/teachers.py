"""Each adapter's own answers to its prompts: the targets data-aware methods fit the merged model to.

The teacher of adapter i is the base plus τᵢ alone (`BranchedModel.teacher(i)`). It reads each of its calibration
prompts and continues it greedily for up to `max_new_tokens` tokens, stopping at EOS (the EOS is kept as a
target: the merge should stop where the adapter stops). With `log_probs`, the teacher's full next-token
distribution at each continuation position is kept too (for a KL loss): a teacher-forced pass over prompt +
continuation, so the positions line up with the student's.

Targets are cached on disk (`cache_dir`, default `$MERGEKIT_LITE_CACHE/teachers` or
`~/.cache/mergekit_lite/teachers`), keyed by a hash of everything that decides them: the base's weight files and
config, the adapter's files, the prompts' token ids, `max_new_tokens`, the compute dtype and device type. The base
is hashed in full once per process and file state (about a second per GB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .batches import TokenBatch, chunks, pad
from .model import BranchedModel

logger = logging.getLogger(__name__)

#: bump when the targets' definition changes (old cache entries are then ignored)
CACHE_VERSION = 1
DEFAULT_MAX_NEW_TOKENS = 16
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


@dataclass
class TeacherSet:
    """One adapter's calibration examples: prompt token ids, its greedy continuation, optionally its log-probs."""

    adapter: int
    prompts: list[list[int]]
    continuations: list[list[int]]
    #: per example, len(continuation) × vocab log-probabilities of the teacher (None: not kept)
    log_probs: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> TeacherSet:
        """The examples at `indices`, in that order."""
        return TeacherSet(self.adapter, [self.prompts[i] for i in indices], [self.continuations[i] for i in indices],
                          None if self.log_probs is None else [self.log_probs[i] for i in indices])


@dataclass(frozen=True)
class TrainingBatch:
    """Prompt + continuation sequences, right-padded, with what to predict where.

    `targets[b, j]` is the token to predict from position j (−100 where nothing is); `teacher` (KL only) holds
    the teacher's log-probs at those positions (zeros elsewhere)."""

    tokens: TokenBatch
    targets: torch.Tensor
    teacher: torch.Tensor | None = None


def training_batch(examples: TeacherSet, indices: Sequence[int], pad_id: int, vocab: int) -> TrainingBatch:
    """One batch of examples `indices` of `examples`: inputs prompt + continuation, targets the continuation."""
    sequences = [examples.prompts[i] + examples.continuations[i] for i in indices]
    tokens = pad(sequences, pad_id, "right")
    targets = torch.full(tokens.input_ids.shape, -100, dtype=torch.long)
    teacher = None if examples.log_probs is None else torch.zeros(*tokens.input_ids.shape, vocab)
    for row, i in enumerate(indices):
        start = len(examples.prompts[i]) - 1
        cont = examples.continuations[i]
        targets[row, start:start + len(cont)] = torch.tensor(cont, dtype=torch.long)
        if teacher is not None:
            teacher[row, start:start + len(cont)] = examples.log_probs[i]  # type: ignore[index]
    return TrainingBatch(tokens, targets, teacher)


def teacher_sets(model: BranchedModel, prompts: Sequence[list[list[int]]], *, sources: Sequence[str],
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, log_probs: bool = False, batch_size: int = 16,
                 cache_dir: Path | None = None, adapter_folders: Sequence[Path] = (),
                 base_folder: Path | None = None) -> list[TeacherSet]:
    """Every adapter's teacher targets for its own prompts (`prompts[i]`: adapter i's token ids), cached on disk.

    `sources` names each adapter's calibration for messages; `adapter_folders` and `base_folder` key the cache
    (no cache without them)."""
    sets = []
    cache = resolve_cache_dir(cache_dir) if base_folder is not None and adapter_folders else None
    base_hash = folder_hash(base_folder) if cache is not None else ""
    for index, ids in enumerate(prompts):
        key = None
        if cache is not None:
            key = _key(base_hash, folder_hash(adapter_folders[index]), ids, max_new_tokens, log_probs, model)
            cached = _load(cache / f"{key}.pt", index)
            if cached is not None:
                logger.info("teacher targets of '%s' from the cache", model.labels[index])
                sets.append(cached)
                continue
        with torch.no_grad(), model.teacher(index):
            continuations = _generate(model, ids, max_new_tokens, batch_size)
            examples = TeacherSet(index, [list(p) for p in ids], continuations)
            if log_probs:
                examples.log_probs = _log_probs(model, examples, batch_size)
        logger.info("teacher '%s': %d prompts from %s continued (mean %.1f tokens)", model.labels[index], len(ids),
                    sources[index], sum(map(len, continuations)) / max(1, len(continuations)))
        if cache is not None and key is not None:
            _save(cache / f"{key}.pt", examples)
        sets.append(examples)
    return sets


def _generate(model: BranchedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              batch_size: int) -> list[list[int]]:
    """Greedy continuations (EOS included when reached, nothing after it), batch by batch, left-padded.

    A plain loop of full forwards (no KV cache, positions from the padding mask): at calibration's few short
    prompts it is several times faster than `generate`'s per-step machinery, and every step is the same
    computation the student's teacher-forced pass makes."""
    eos = model.eos_ids
    out: list[list[int]] = []
    for rows in chunks(len(prompts), batch_size):
        batch = pad([prompts[i] for i in rows], model.pad_id, "left").to(model.device)
        ids, mask = batch.input_ids, batch.attention_mask
        done = torch.zeros(len(rows), dtype=torch.bool, device=model.device)
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            token = logits[:, -1].argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, model.pad_id), token)
            new.append(token)
            done |= torch.isin(token, torch.tensor(sorted(eos), device=model.device, dtype=token.dtype))
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, (~done | torch.isin(token, torch.tensor(sorted(eos), device=model.device,
                                                                             dtype=token.dtype)))[:, None].long()],
                             dim=1)
            if bool(done.all()):
                break
        for row in torch.stack(new, dim=1).tolist():
            continuation: list[int] = []
            for token in row:
                continuation.append(int(token))
                if token in eos:
                    break
            out.append(continuation)
    return out


def _log_probs(model: BranchedModel, examples: TeacherSet, batch_size: int) -> list[torch.Tensor]:
    """The teacher's next-token log-probs over each continuation (teacher-forced, as the student will read it)."""
    vocab = None
    out: list[torch.Tensor] = []
    for rows in chunks(len(examples), batch_size):
        batch = training_batch(examples, list(rows), model.pad_id, 1)
        logits = model.logits(batch.tokens)
        vocab = logits.shape[-1]
        log_p = torch.log_softmax(logits, dim=-1).cpu()
        for row, i in enumerate(rows):
            start = len(examples.prompts[i]) - 1
            out.append(log_p[row, start:start + len(examples.continuations[i])].clone())
    assert vocab is None or all(t.shape[-1] == vocab for t in out)
    return out


# ------------------------------------------------------------------------------------------------------ cache


def resolve_cache_dir(cache_dir: Path | None) -> Path:
    """Where teacher targets are kept: the argument, else $MERGEKIT_LITE_CACHE/teachers, else ~/.cache/..."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("MERGEKIT_LITE_CACHE")
    return Path(root) / "teachers" if root else Path.home() / ".cache" / "mergekit_lite" / "teachers"


def folder_hash(folder: Path | None) -> str:
    """A content hash of a model or adapter folder's weight and config files (memoized per file state)."""
    if folder is None:
        return ""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or not (path.suffix in (".safetensors", ".bin") or path.name.endswith("config.json")):
            continue
        digest.update(path.name.encode())
        digest.update(_file_hash(path).encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _key(base_hash: str, adapter_hash: str, prompts: Sequence[Sequence[int]], max_new_tokens: int, log_probs: bool,
         model: BranchedModel) -> str:
    text = json.dumps({"v": CACHE_VERSION, "base": base_hash, "adapter": adapter_hash, "prompts": [list(p) for p in prompts],
                       "max_new_tokens": max_new_tokens, "log_probs": log_probs, "dtype": str(model.dtype),
                       "device": model.device.type})
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _load(path: Path, index: int) -> TeacherSet | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        return TeacherSet(index, data["prompts"], data["continuations"], data.get("log_probs"))
    except Exception as error:  # a damaged or foreign cache entry is recomputed, never trusted
        logger.warning("ignoring unreadable teacher cache %s (%s)", path, error)
        return None


def _save(path: Path, examples: TeacherSet) -> None:
    """Write one cache entry atomically (a crash never leaves half an entry under the final name)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.part")
        data = {"prompts": examples.prompts, "continuations": examples.continuations}
        if examples.log_probs is not None:
            data["log_probs"] = examples.log_probs
        torch.save(data, part)
        os.replace(part, path)
    except OSError as error:
        logger.warning("could not cache teacher targets in %s (%s); they will be recomputed next time", path,
                       error.strerror or error)


def check_prompts(prompts: Sequence[Sequence[int]], where: str) -> None:
    """Refuse an adapter without prompts (its teacher would have nothing to say)."""
    if not prompts:
        raise InputError(f"{where}: no calibration prompts")
