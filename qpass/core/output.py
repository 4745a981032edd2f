"""Output directories written all or nothing: into a temporary directory beside the target, moved into place only
when the writer and its read-back check have succeeded."""

import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from qpass.core.errors import QpassError


def check_output_dir(out_dir: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written all or nothing: a symbolic link (on it or on a
    directory above it that does not exist yet), a file, a directory that exists and is not empty (unless ``force``),
    one not writable, and (``--force`` or not) one that is, holds or lies inside any of ``inputs``: an input is never
    replaced, nor written into; nor is the current directory (``-o .``, ``-o ..``, an empty ``-o``, which is ``.``)."""
    if str(out_dir) == "":
        raise QpassError("-o is empty (an unset variable?); give the path of a new or empty directory")
    out = Path(out_dir)
    for path in (out, *out.parents):
        if path.is_symlink() and (path == out or not path.exists()):
            where = "is" if path == out else f"lies under {path}, which is"
            raise QpassError(
                f"-o {out}: {where} a symbolic link{'' if path.exists() else ' to nothing (or a loop)'}; "
                "give the real path of a new or empty directory"
            )
    _check_apart(out, inputs)
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise QpassError(
            f"-o {out}: is or holds the current directory, which the output would replace; choose a new directory"
        )
    if out.exists() and not out.is_dir():
        raise QpassError(f"-o {out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise QpassError(f"-o {out}: directory exists and is not empty; choose another, or pass --force to replace it")
    parent = next(p for p in out.absolute().parents if p.exists())  # where the output's directories will be made
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QpassError(
            f"-o {out}: cannot create it under {parent} (not a writable directory); choose an output path you can write"
        )


def _check_apart(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output path that is, holds or lies inside an input (symbolic links followed)."""
    target = out.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        source = Path(item).resolve()
        relation = (
            "is"
            if target == source
            else "holds"
            if source.is_relative_to(target)
            else "lies inside"
            if target.is_relative_to(source)
            else None
        )
        if relation:
            raise QpassError(
                f"-o {out}: {relation} the input {item}; an input is never replaced or written into, "
                "--force or not: choose an output path outside every input"
            )


@contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()):
    """Yield a temporary directory beside ``out_dir``; move it into place only if the block succeeds.
    ``inputs``: the paths the output must keep apart from (:func:`check_output_dir`)."""
    check_output_dir(out_dir, force, inputs)
    out = Path(os.path.abspath(out_dir))  # ``a/..`` normalized: the temporary directory lies beside the output
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
