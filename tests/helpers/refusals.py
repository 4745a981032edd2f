"""What every refusal test asserts beside its message: a watch on the first forward pass of each road (a refusal must
come before it wherever the fault was knowable then), and the bytes of every input file, before and after."""

import hashlib
from pathlib import Path


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``."""
    return {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest()
        for root in roots
        for f in sorted(Path(root).rglob("*"))
        if f.is_file()
    }


def watch_forward_passes(monkeypatch) -> list[str]:
    """Record (in the list returned) each entry to a road's first forward pass: calibration and measurement in the
    compile road, a read-back directory's perplexity and generation in `qpass eval` / `qpass run`."""
    import qpass.core.compile as road
    import qpass.frontends.onnx as onnx_frontend
    import qpass.frontends.torch_export as torch_frontend

    started = []

    def watch(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started.append(f"{owner.__name__}.{name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in ((road, "calibrate"), (road, "_measure")):
        watch(owner, name)
    for owner in (onnx_frontend, torch_frontend):
        watch(owner, "saved_nll")
        watch(owner, "generate")
    return started
