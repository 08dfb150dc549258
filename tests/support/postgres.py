"""A private PostgreSQL server on loopback for tests (Debian's postgresql package).

What the machines here need (learned the hard way): initdb and postgres
refuse to run as root, so as root the data directory is owned by and the
server run as ``nobody``; the binaries are not on PATH but under
/usr/lib/postgresql/<version>/bin; the socket directory is the data
directory's parent (no /run/postgresql needed); fsync is off (test data
only).  Trust authentication on 127.0.0.1 for the user ``mailgate``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from typing import Optional

import pytest

from tests.support.ports import free_port


def pg_bindir() -> str:
    """The newest installed server's bin directory; skip (fail in CI) when none."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: [int(x) for x in d.split("/")[-2].split(".")
                                                                         if x.isdigit()])
    dirs = [d for d in dirs if os.access(os.path.join(d, "initdb"), os.X_OK)]
    if dirs:
        return dirs[-1]
    if os.environ.get("CI") == "true":
        pytest.fail("PostgreSQL is not installed; `make test` (as root) installs it", pytrace=False)
    pytest.skip("PostgreSQL not installed (run `make test` as root to install it)")


class PostgresServer:
    def __init__(self, bindir: str, port: Optional[int] = None):
        self.bindir = bindir
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="mailgate-pg-")
        self.data = os.path.join(self.dir, "data")
        self.as_root = os.geteuid() == 0
        self._created = 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_root:  # initdb/postgres refuse root
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + cmd
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.dir)

    def start(self) -> "PostgresServer":
        if self.as_root:
            shutil.chown(self.dir, "nobody", "nogroup")
        r = self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "mailgate", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout}\n{r.stderr}")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off")
        r = self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-o", opts,
                      "-l", os.path.join(self.dir, "log"), "-w", "-t", "60", "start")
        if r.returncode != 0:
            log = ""
            try:
                with open(os.path.join(self.dir, "log")) as f:
                    log = f.read()[-3000:]
            except OSError:
                pass
            raise RuntimeError(f"postgres did not start: {r.stdout}\n{r.stderr}\n{log}")
        self._wait()
        return self

    def _wait(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://mailgate@127.0.0.1:{self.port}/{db}"

    def url(self, db: str = "postgres") -> str:
        """The form ``[tracking] url`` takes."""
        return self.dsn(db)

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        import psycopg

        self._created += 1
        name = f"{prefix}{os.getpid()}_{self._created}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """One server for the session; each test takes its own database from it."""
    server = PostgresServer(pg_bindir()).start()
    try:
        yield server
    finally:
        server.stop()
