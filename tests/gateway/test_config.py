"""Config schema: defaults, validation messages, routes."""

import pytest

from gateway import config as cfg
from gateway.config import Route, parse_duration, parse_route, route_for
from gateway.errors import ConfigError


def load(text, tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(text)
    return cfg.load(str(p), {})


def test_defaults_without_a_file_are_the_embedded_config():
    c = cfg.load(None, {})
    assert [str(l) for l in c.server.listen] == ["127.0.0.1:2525"]
    assert c.relay.domains == ["example.test"]
    assert route_for(c.routes, "example.test") == Route("local", path="var/mail")
    assert c.spam.threshold == 5.0 and c.spam.subject_tag == "SPAM*** %s"


def test_issue_example_config_is_valid(tmp_path):
    c = load('''
[server]
listen = ["127.0.0.1:2525", "[::1]:25"]
hostname = "mx.example.test"
max_message_size = 10485760
max_recipients = 100
[relay]
domains = ["Example.TEST."]
trusted_networks = ["10.0.0.0/8"]
[routes]
"example.test" = "smtp:[10.0.0.5]:25"
"*" = "mx"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = 3.0
[spam]
threshold = 5.0
subject_tag = "SPAM*** %s"
reject_threshold = 15.0
[queue]
dir = "var/queue"
lifetime = "5d"
[auth]
users_file = ""
''', tmp_path)
    assert c.relay.domains == ["example.test"]
    assert c.queue.lifetime == 5 * 86400
    assert c.dns.nameservers[0].port == 5353
    assert c.routes["example.test"] == Route("smtp", host="10.0.0.5", port=25)
    assert str(c.server.listen[1]) == "[::1]:25"


@pytest.mark.parametrize("text,expected", [
    ("[server]\nbogus = 1\n", "server.bogus = 1: unknown key"),
    ("[nosuch]\nx = 1\n", "nosuch: unknown key"),
    ('[server]\nlisten = ["127.0.0.1"]\n', "server.listen.0 = '127.0.0.1': a port is required"),
    ('[server]\nlisten = ["mail.example.test:25"]\n', "listen address must be an IP address"),
    ("[server]\nmax_message_size = -1\n", "server.max_message_size = -1"),
    ('[relay]\ntrusted_networks = ["10.0.0.0/33"]\n', "relay.trusted_networks.0 = '10.0.0.0/33'"),
    ('[relay]\ndomains = ["not a domain"]\n', "not a valid domain name"),
    ('[routes]\n"x.test" = "ftp:host"\n', "routes.x.test = 'ftp:host'"),
    ('[spam]\nsubject_tag = "[SPAM]"\n', "must contain %s exactly once"),
    ("[spam]\nthreshold = 8\nreject_threshold = 6\n", "must not be below spam.threshold"),
    ('[queue]\nlifetime = "5 fortnights"\n', "queue.lifetime = '5 fortnights': expected a duration"),
    ('[dns]\nnameservers = ["resolver.test"]\n', "dns.nameservers.0"),
    ('[server]\ntls_certificate = "c.pem"\n', "give both or neither"),
    ("[server\n", "not valid TOML"),
])
def test_bad_values_name_key_value_and_reason(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load(text, tmp_path)
    assert expected in str(err.value)


def test_missing_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="config file not found"):
        cfg.load("/nonexistent/mailgate.toml", {})


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    assert parse_duration(12) == 12.0
    with pytest.raises(ValueError):
        parse_duration(-1)


def test_route_forms_and_lookup():
    assert parse_route("smtp:mail.example.test:2525") == Route("smtp", "mail.example.test", 2525, mx_lookup=True)
    assert parse_route("smtp:[::1]:25") == Route("smtp", "::1", 25)
    assert parse_route("local:/var/mail") == Route("local", path="/var/mail")
    routes = {"example.test": Route("local", path="a"), ".sub.test": Route("local", path="b"), "*": Route("mx")}
    assert route_for(routes, "EXAMPLE.test.").path == "a"
    assert route_for(routes, "deep.sub.test").path == "b"
    assert route_for(routes, "other.test").kind == "mx"


def test_find_config_path_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    assert cfg.find_config_path(None) is None
    (tmp_path / "mailgate.toml").write_text("")
    assert cfg.find_config_path(None) == "mailgate.toml"
    monkeypatch.setenv("MAILGATE_CONFIG", "/etc/x.toml")
    assert cfg.find_config_path(None) == "/etc/x.toml"
    assert cfg.find_config_path("given.toml") == "given.toml"


def test_shipped_example_config_is_valid():
    from pathlib import Path

    from gateway.plugins import discover

    example = Path(__file__).resolve().parents[2] / "mailgate.example.toml"
    c = cfg.load(str(example), discover().sections)
    assert c.spam.threshold == 5.0 and c.relay.domains == ["example.test"]


def test_check_files_names_each_missing_or_unreadable_file(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "adir").mkdir()
    c = load(f'[server]\ntls_certificate = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/nokey.pem"\n'
             f'[auth]\nusers_file = "{tmp_path}/adir"\n', tmp_path)
    with pytest.raises(ConfigError) as err:
        cfg.check_files(c, "m.toml")
    assert err.value.problems == [
        f"server.tls_key = '{tmp_path}/nokey.pem': no such file",
        f"auth.users_file = '{tmp_path}/adir': is a directory, not a file",
    ]
    assert str(err.value).startswith("m.toml: ")


def test_check_files_passes_readable_and_unset_files(tmp_path):
    (tmp_path / "users").write_text("a:{PLAIN}b\n")
    cfg.check_files(load(f'[auth]\nusers_file = "{tmp_path}/users"\n', tmp_path))
    cfg.check_files(cfg.load(None, {}))  # nothing named, nothing to check
