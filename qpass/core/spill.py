"""The one buffer for values passed from layer to layer in a layer-wise run (hidden states, the values crossing an
ONNX stage boundary): one array per window batch under a name, in memory up to a budget, past it in ``.npy`` files.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch


class Spill:
    """Arrays by ``(name, batch)``: in memory while they fit in ``budget`` bytes, past it each in a ``.npy`` file of a
    temporary directory (read back memory-mapped, with no file handle kept open), removed when its name is dropped.
    A context manager: the directory is removed on the way out, however the block ends."""

    def __init__(self, budget: int, prefix: str = "qpass-layerwise-"):
        self.budget, self.held, self.count, self.prefix = budget, 0, 0, prefix
        self.values: dict[str, dict[int, np.ndarray | Path]] = {}
        self._directory: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.values.clear()
        if self._directory is not None:
            self._directory.cleanup()

    @property
    def directory(self) -> str | None:
        """The temporary directory the values went to once they no longer fit in memory, or None."""
        return None if self._directory is None else self._directory.name

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def names(self) -> list[str]:
        return list(self.values)

    def put(self, name: str, batch: int, value: np.ndarray | torch.Tensor) -> None:
        """Keep ``value`` as ``name``'s value for ``batch``, in place of any it had (where that one was kept)."""
        value = value.numpy() if isinstance(value, torch.Tensor) else value
        kept = self.values.setdefault(name, {})
        old = kept.get(batch)
        if isinstance(old, np.ndarray):
            self.held -= old.nbytes
        if isinstance(old, Path):
            old.unlink()  # a new file, not the old one rewritten: a reader may still map the old one
        if isinstance(old, Path) or self.held + value.nbytes > self.budget:
            kept[batch] = self._save(value)
        else:
            self.held += value.nbytes
            kept[batch] = value

    def get(self, name: str, batch: int) -> np.ndarray:
        """``name``'s value for ``batch`` (a read-only memory map where it went to a file)."""
        value = self.values[name][batch]
        return np.load(value, mmap_mode="r") if isinstance(value, Path) else value

    def tensor(self, name: str, batch: int) -> torch.Tensor:
        """:meth:`get` as a tensor (a copy of a file's, which torch would otherwise refuse to write through)."""
        value = self.get(name, batch)
        return torch.from_numpy(value if value.flags.writeable else np.array(value))

    def drop(self, name: str) -> None:
        """Forget every batch of ``name`` (its files removed)."""
        for value in self.values.pop(name).values():
            if isinstance(value, Path):
                value.unlink()
            else:
                self.held -= value.nbytes

    def _save(self, value: np.ndarray) -> Path:
        if self._directory is None:
            self._directory = tempfile.TemporaryDirectory(prefix=self.prefix)
        path = Path(self._directory.name) / f"{self.count}.npy"
        self.count += 1
        np.save(path, value)
        return path
