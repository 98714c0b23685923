"""One way to write a file so that a crash never leaves half of it: a temporary file beside it, then a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def _mode_of(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder (same suffix), then rename it to ``path``.

    The rename is atomic on POSIX and Windows: readers see the old file or the new one, never a part;
    on any error the temporary file is removed and ``path`` is left as it was. The file gets the mode
    the file it replaces had, else the one a plain ``open()`` would give it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp's file is private (0600); the result gets the mode a plain open() would give it (the old
        # file's, else 0666 less the umask), so a profile stays readable by the server that loads it.
        os.chmod(tmp, _mode_of(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
