"""Fixtures shared by the whole suite."""

from __future__ import annotations

import asyncio
import sys

# The gateway runs on Twisted's asyncio reactor (dnspython's async resolver
# needs it); install it before anything imports twisted.internet.reactor.
if "twisted.internet.reactor" not in sys.modules:
    from twisted.internet import asyncioreactor

    _loop = asyncio.new_event_loop()
    asyncio.set_event_loop(_loop)
    asyncioreactor.install(_loop)

import pytest  # noqa: E402

from tests.support.gateway import mailgate_factory  # noqa: E402
from tests.support.sink import sink  # noqa: E402,F401  (re-exported fixture)


@pytest.fixture
def mailgate(tmp_path, sink):  # noqa: F811
    make = mailgate_factory(tmp_path, sink)
    yield make
    for gw in make.started:
        gw.kill()
        if getattr(gw, "_log", None):
            gw._log.close()
    for server in make.servers:
        server.stop(final=True)


def pytest_terminal_summary(terminalreporter):
    """Figures a test reports with ``record_property("report", text)`` (say, the
    duplicates of a crash test), shown even for a passing test under -q."""
    lines = [f"{rep.nodeid}: {value}"
             for outcome in ("passed", "failed")
             for rep in terminalreporter.stats.get(outcome, [])
             if rep.when == "call"
             for key, value in rep.user_properties if key == "report"]
    if lines:
        terminalreporter.section("reported by tests")
        for line in lines:
            terminalreporter.write_line(line)
