"""Output directories written all or nothing: into a temporary directory beside the target, moved into place only
when the writer and its read-back check have succeeded."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qpass.core.errors import QpassError


def check_output_dir(out_dir: str | Path, force: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``force``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QpassError(f"-o {out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QpassError(f"-o {out}: directory exists and is not empty; choose another, or pass --force to replace it")
    parent = next(p for p in out.absolute().parents if p.exists())  # where the output's directories will be made
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QpassError(
            f"-o {out}: cannot create it under {parent} (not a writable directory); choose an output path you can write"
        )


@contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool):
    """Yield a temporary directory beside ``out_dir``; move it into place only if the block succeeds."""
    out = Path(out_dir)
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qpass-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the output is an ordinary directory
    except OSError as err:
        raise QpassError(f"-o {out}: cannot create it ({err.strerror}); choose an output path you can write") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
