"""Finding the real programs tests start.  In CI (CI=true) a missing program
is a failure, never a skip: `make test` installs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

import pytest

SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def require_program(name: str) -> str:
    path = shutil.which(name) or next(
        (os.path.join(d, name) for d in SBIN if os.access(os.path.join(d, name), os.X_OK)), None
    )
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed; `make test` (as root) installs it", pytrace=False)
    pytest.skip(f"{name} not installed (run `make test` as root to install it)")


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM, wait, then SIGKILL: every server a test starts ends this way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
