"""Where input files may live, and the one guarded way we load a pickle (only when the user opts in)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch

from ..errors import CheckpointError, InputError


def dangling(path: Path) -> str:
    """What to add to a "no such file" message when `path` is a symlink that leads nowhere (a loop, or a missing
    target), so the user looks at the link rather than for a missing file; else ''."""
    return " (it is a symlink that leads nowhere: a loop or a missing target)" if path.is_symlink() and not \
        path.exists() else ""


def inside_folder(folder: Path, name: str, path: Path, where: str = "file",
                  error: type[InputError] = CheckpointError) -> Path:
    """`path` (named `name` by a file of `folder`), refused when it could leave the folder.

    An index written by a stranger could name `../../.ssh/id_rsa` or `/etc/passwd`; a symlink could do the
    same. Names must be relative without `..`, and the resolved file must stay inside the folder (or, for a
    Hugging Face cache snapshot, inside that repository's cache, where snapshot files link to blobs).
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\x00" in name:
        raise error(f"{where} {name!r} in {folder} is not a plain relative file name; refusing to read outside the "
                    "model folder")
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as failure:  # a symlink loop
        raise error(f"{where} {name!r} in {folder} cannot be resolved ({failure})") from None
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent.resolve())
    if not any(resolved.is_relative_to(root) for root in roots):
        raise error(f"{where} {name!r} in {folder} resolves to {resolved}, outside the model folder (a symlink?); "
                    "refusing to read it")
    return path


def load_pickled(path: Path, error: type[InputError]) -> dict[str, torch.Tensor]:
    """A pickled state dict loaded with torch.load(weights_only=True): tensors only, no code runs.

    Memory-mapped when the file is in torch's zip format, so a large shard is paged in as it is read.
    """
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as mmap_error:
            if "mmap" not in str(mmap_error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as failure:  # noqa: BLE001 - any refusal of an untrusted pickle becomes our one error
        first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise error(f"{path}: refused by torch.load(weights_only=True): {first[:300]}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise error(f"{path}: not a state dict of named tensors")
    return loaded


class PickledTensors:
    """A pickled adapter state dict behind the small read API of SafetensorsFile (keys, shape, is_float, tensor)."""

    def __init__(self, path: Path, error: type[InputError]) -> None:
        self.path = path
        self._tensors = load_pickled(path, error)

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape."""
        return tuple(self._tensors[name].shape)

    def is_float(self, name: str) -> bool:
        """True for floating-point tensors (the only kind a LoRA factor can be)."""
        return self._tensors[name].is_floating_point()

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """A tensor, or its rows [start, stop), as a fresh copy."""
        tensor = self._tensors[name]
        return (tensor if start is None and stop is None else tensor[start:stop]).clone()

    def close(self) -> None:
        """Drop the tensors (idempotent)."""
        self._tensors = {}
