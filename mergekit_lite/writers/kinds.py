"""Output kinds: what a merge writes into its staging folder, as a strategy the API runs without knowing which.

A kind owns its tensor layout, how the engine's tensors become that layout (the producer), its side files,
and how its card relates to the base. The sharded safetensors writer, the staging folder, the atomic swap and
the integrity check are shared: a second kind (a PEFT adapter) reuses all four.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..formats.integrity import check_written
from ..formats.safetensors import TensorInfo
from ..progress import Progress
from .adapter import PeftAdapterOutput
from .card import render_card
from .checkpoint import ShardedWriter, side_file_bytes, write_side_files
from .output_files import CARD, CONFIG_COPY, write_text

if TYPE_CHECKING:  # the API imports this module; these are only types here
    from ..config import MergeConfig
    from ..engine.loop import EngineStats, MergeEngine

class OutputKind(Protocol):
    """One kind of output: a layout, a producer, side files and a card relation."""

    #: the `output.format` name
    name: str
    #: `base_model_relation` on the card ("merge" for a checkpoint, "adapter" for a PEFT adapter)
    card_relation: str

    def layout(self, engine: MergeEngine) -> list[TensorInfo]:
        """The output tensors in write order, with their dtypes and sizes (the engine's schedules decided)."""
        ...

    def side_file_bytes(self, base_folder: Path) -> int:
        """Bytes of the side files, for the free-space check."""
        ...

    def produce(self, engine: MergeEngine, writer: ShardedWriter, progress: Progress) -> EngineStats:
        """Run the engine into the writer, tensor by tensor in layout order."""
        ...

    def shard_size(self, config: MergeConfig) -> int:
        """Bytes per safetensors shard."""
        ...

    def finish(self, staging: Path, layout: list[TensorInfo], base_folder: Path, config: MergeConfig) -> None:
        """After the tensors: check every shard against the layout, then write the side files."""
        ...

    def summary(self) -> str:
        """What this kind adds to `merge run`'s summary line ('' when nothing)."""
        ...

    def card_sections(self) -> list[str]:
        """The kind's own card sections, after it wrote (a card rendered again later keeps them)."""
        ...


@dataclass(frozen=True)
class CheckpointOutput:
    """A standard Hugging Face checkpoint: every base tensor, merged or copied, plus the base's side files."""

    name: str = "checkpoint"
    card_relation: str = "merge"

    def layout(self, engine: MergeEngine) -> list[TensorInfo]:
        """Every base tensor in read order, in its output dtype."""
        return [TensorInfo(t.name, t.out_dtype, t.info.shape, t.out_nbytes) for t in engine.plan.tensors]

    def side_file_bytes(self, base_folder: Path) -> int:
        """config.json, generation config and tokenizer files copied from the base."""
        return side_file_bytes(base_folder)

    def produce(self, engine: MergeEngine, writer: ShardedWriter, progress: Progress) -> EngineStats:
        """The engine writes W + merged delta (or W as is) for every base tensor."""
        return engine.run(writer, progress)

    def shard_size(self, config: MergeConfig) -> int:
        """`output.shard_size`."""
        return config.output.shard_size

    def finish(self, staging: Path, layout: list[TensorInfo], base_folder: Path, config: MergeConfig) -> None:
        """The base's config (dtype updated), generation config and tokenizer; the resolved config; the card;
        then every shard re-opened and checked against the layout."""
        write_side_files(base_folder, staging, config.output.dtype)
        write_text(staging / CONFIG_COPY, config.to_yaml())
        write_text(staging / CARD, render_card(config))
        check_written(staging, layout)

    def summary(self) -> str:
        """Nothing to add."""
        return ""

    def card_sections(self) -> list[str]:
        """None: the card's method, adapters and reproduce sections say it all."""
        return []


#: output.format -> the kind's name (the values `output_kind` builds)
OUTPUT_FORMATS = ("checkpoint", "peft")


def output_kind(config: MergeConfig) -> OutputKind:
    """A fresh output kind for `config`'s `output.format` (a kind records what it wrote, for the card)."""
    if config.output.format == "peft":
        return PeftAdapterOutput(rank=config.output.rank, dtype=config.output.dtype)
    return CheckpointOutput()


def write_output(kind: OutputKind, engine: MergeEngine, staging: Path, base_folder: Path, config: MergeConfig,
                 layout: list[TensorInfo], progress: Progress) -> tuple[EngineStats, int]:
    """Produce `kind` into `staging`, then re-open and check every shard against the layout (a short write or
    a layout bug never reaches the target). Returns the engine's stats and the number of shards."""
    writer = ShardedWriter(staging, layout, kind.shard_size(config))
    try:
        stats = kind.produce(engine, writer, progress)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    kind.finish(staging, layout, base_folder, config)
    return stats, len(writer.shards)
