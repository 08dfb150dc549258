"""Fixtures for the scanner tests: a real clamd and c-icap on loopback, the
vendor stand-ins of tests/fakes as executables, and a way to drive the
Deferred-based plumbing without a running reactor."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from twisted.internet import defer, task

from tests.support.programs import require_program

FAKES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fakes")


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory):
    from tests.support.clamd import start_clamd

    binary = require_program("clamd")
    server = start_clamd(str(tmp_path_factory.mktemp("clamd")), binary)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def icap_server(tmp_path_factory, clamd_server):
    from tests.support.icap import find_module_dir, start_c_icap

    binary = require_program("c-icap")
    if find_module_dir() is None:
        require_program("libc-icap-mod-virus-scan")  # fails in CI, skips elsewhere
    server = start_c_icap(str(tmp_path_factory.mktemp("c-icap")), clamd_server.socket_path, binary)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_bin(tmp_path_factory):
    """A directory of executables named like each vendor's scanner, each
    running the stand-in for that vendor."""
    from tests.fakes.cli_av import VENDORS

    d = tmp_path_factory.mktemp("fake-av-bin")
    for vendor in VENDORS:
        p = d / vendor
        p.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKES}/cli_av.py {vendor} \"$@\"\n")
        p.chmod(0o755)
    return d


class Daemon:
    def __init__(self, proc, socket_path):
        self.proc = proc
        self.socket_path = socket_path

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def start_fake(args, ready_path=None, ready_line=False):
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if ready_line:
        assert proc.stdout.readline().strip() == b"ready"
        return proc
    deadline = time.monotonic() + 10
    while not os.path.exists(ready_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args} did not start")
        time.sleep(0.02)
    return proc


@pytest.fixture
def path_daemon(tmp_path):
    """start(flavour) -> Daemon listening on a unix socket in tmp_path."""
    started = []

    def start(flavour):
        sock = str(tmp_path / f"{flavour}.sock")
        d = Daemon(start_fake([f"{FAKES}/path_daemon.py", flavour, sock], ready_path=sock), sock)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def silent_unix(tmp_path):
    sock = str(tmp_path / "silent.sock")
    proc = start_fake([f"{FAKES}/silent_server.py", "unix", sock], ready_line=True)
    yield sock
    proc.terminate()
    proc.wait(timeout=10)


def sync_threads(fn, *args):
    """run_in_thread for tests: runs at once, so Deferreds fire synchronously."""
    return defer.maybeDeferred(fn, *args)


def result_of(d: defer.Deferred):
    """The result of a Deferred that has already fired (fails if it has not)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@pytest.fixture
def clock():
    return task.Clock()
