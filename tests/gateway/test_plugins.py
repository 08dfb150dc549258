"""Finding checks by name and ordering them from config."""

import pytest

from gateway.config import validate
from gateway.errors import ConfigError
from gateway.plugins import discover, select


def test_discovery_finds_the_checks_of_all_packages():
    cat = discover()
    assert {"gtube", "header_sanity"} <= set(cat.checks)
    assert all(isinstance(n, str) for n in cat.sections)


def test_order_and_disabled_from_config():
    cat = discover()
    config = validate({"checks": {"order": ["header_sanity", "gtube"], "disabled": []}}, cat.sections)
    names = [c.name for c in select(cat, config)]
    assert names.index("header_sanity") < names.index("gtube") and names[:2] == ["header_sanity", "gtube"]
    config = validate({"checks": {"disabled": ["gtube"]}}, cat.sections)
    assert "gtube" not in [c.name for c in select(cat, config)]


def test_unknown_check_names_are_refused():
    cat = discover()
    config = validate({"checks": {"disabled": ["no_such_check"]}}, cat.sections)
    with pytest.raises(ConfigError, match="no_such_check"):
        select(cat, config)
