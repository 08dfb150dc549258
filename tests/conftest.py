"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from tests.support.gateway import mailgate_factory
from tests.support.sink import sink  # noqa: F401  (re-exported fixture)


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
