"""The [[scanners]] / [av] schema: defaults, labels, per-type requirements."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config import HostPort
from scanners.settings import DEFAULT_BANNED_EXTENSIONS, AvSettings, ScannerSettings


def test_av_defaults_are_the_safe_ones():
    av = AvSettings()
    assert (av.on_infected, av.on_error) == ("reject", "tempfail")
    assert av.banned_attachments and av.banned_executable_content and av.banned_in_archives
    assert av.self_test_interval == 600
    assert av.banned_extensions == list(DEFAULT_BANNED_EXTENSIONS)


def test_durations_and_addresses_are_parsed():
    s = ScannerSettings(type="clamd", address="127.0.0.1:3310", timeout="1m", circuit_reset="2m")
    assert s.address == HostPort("127.0.0.1", 3310)
    assert (s.timeout, s.circuit_reset) == (60.0, 120.0)
    assert AvSettings(self_test_interval="5m").self_test_interval == 300.0


@pytest.mark.parametrize("kwargs, label", [
    (dict(type="clamd", socket="/s"), "clamd"),
    (dict(type="clamd", socket="/s", name="primary"), "primary"),
    (dict(type="command", profile="f-prot"), "f-prot"),
    (dict(type="command", command="/opt/acme/bin/acmescan --mail", clean_codes=[0], infected_codes=[1]), "acmescan"),
    (dict(type="icap", address="10.0.0.5:1344"), "icap"),
])
def test_label(kwargs, label):
    assert ScannerSettings(**kwargs).label == label


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="clamd", socket="/s", address="127.0.0.1:3310"), "not both"),
    (dict(type="trophie"), "needs socket"),
    (dict(type="command", command="/x", clean_codes=[0], infected_codes=[1], names=["no group"]), "group"),
    (dict(type="clamd", socket="/s", retries=9), "less than or equal to 5"),
])
def test_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ScannerSettings(**kwargs)


def test_extensions_are_normalised():
    assert AvSettings(banned_extensions=[".EXE", " Scr "]).banned_extensions == ["exe", "scr"]


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        AvSettings().on_error = "accept-tagged"
