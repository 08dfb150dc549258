"""Replacing a file so that a reader sees the old contents or the new, never half.

The Bayes model and the web console's users file are rewritten whole while
other processes read them; the temporary file lives in the same directory
(``os.replace`` is atomic only within one file system) and is fsynced before
the rename, so after a crash the new file is complete or absent.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional


@contextmanager
def replaced_file(path: str, mode: str = "wb", prefix: str = ".tmp-", suffix: str = "",
                  permissions: Optional[int] = None, encoding: Optional[str] = None) -> Iterator:
    """A file object whose contents replace ``path`` when the block ends without
    an error; on an error the temporary file goes and ``path`` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if permissions is not None:
            os.chmod(tmp, permissions)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
