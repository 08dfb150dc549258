"""The delivery process: supervised by `mailgate run`, never orphaned."""

import os
import signal
import subprocess
import time

from tests.gateway.test_service import HAM, send, wait_until
from tests.support.ports import free_port
from tests.support.sink import Sink


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}/stat") else "X"
    return stat != "Z"


def test_a_killed_delivery_process_is_replaced_and_delivers(mailgate):
    port = free_port()
    gw = mailgate(downstream_port=port)
    assert wait_until(lambda: len(children(gw.proc.pid)) == 1)
    [child] = children(gw.proc.pid)
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: "delivery process ended" in gw.log())
    assert wait_until(lambda: children(gw.proc.pid) and children(gw.proc.pid) != [child])
    with Sink(port=port) as back:
        assert send(gw) == {}
        assert back.wait_for(1, timeout=20)
        assert back.messages[0].data.endswith(HAM.split(b"\r\n\r\n", 1)[1])


def test_the_delivery_process_leaves_with_its_parent(mailgate):
    gw = mailgate()
    assert wait_until(lambda: len(children(gw.proc.pid)) == 1)
    [child] = children(gw.proc.pid)
    gw.kill()  # SIGKILL: no goodbye, only the pipe closing
    assert wait_until(lambda: not alive(child), timeout=20)


def test_sigterm_stops_both_processes(mailgate):
    gw = mailgate()
    assert wait_until(lambda: len(children(gw.proc.pid)) == 1)
    [child] = children(gw.proc.pid)
    assert gw.stop() == 0
    assert wait_until(lambda: not alive(child), timeout=10)
    time.sleep(0.2)
    assert "delivery process ended" not in gw.log()  # an orderly stop is not a crash


def test_sighup_reaches_the_delivery_process(mailgate, sink):
    dead = free_port()
    gw = mailgate(downstream_port=dead)
    assert send(gw) == {}
    assert wait_until(lambda: "deferred=1" in gw.log())
    # the admin points the route at a server that works, reloads, flushes
    gw.config_path.write_text(gw.config_path.read_text().replace(f"[127.0.0.1]:{dead}", f"[127.0.0.1]:{sink.port}"))
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: "reloaded config" in gw.log())
    assert gw.cli("queue", "flush").returncode == 0
    assert sink.wait_for(1, timeout=20)


def test_a_replaced_delivery_process_runs_the_accepted_config_not_a_broken_file(mailgate):
    port = free_port()
    gw = mailgate(downstream_port=port)
    assert wait_until(lambda: len(children(gw.proc.pid)) == 1)
    [child] = children(gw.proc.pid)
    running = gw.queue_dir() / "config.running.toml"
    assert running.read_bytes() == gw.config_path.read_bytes()
    assert os.stat(running).st_mode & 0o077 == 0  # may hold passwords
    gw.config_path.write_text("[server\nthis is not TOML")  # an edit in progress
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: children(gw.proc.pid) and children(gw.proc.pid) != [child])
    with Sink(port=port) as back:
        assert send(gw) == {}
        assert back.wait_for(1, timeout=20)
    assert gw.log().count("delivery process ended") == 1  # started once more, not in a loop


def test_reload_that_cannot_write_the_config_keeps_the_child_on_its_old_one(tmp_path, monkeypatch, caplog):
    import logging

    from gateway.deliverd import DeliveryAgent
    from gateway.spool import Spool

    agent = DeliveryAgent(Spool(str(tmp_path)), reactor=None, run_in_thread=None, config_source=b"[server]\n")
    told = []
    agent._tell = told.append

    def disk_full(source):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(agent, "_write_config", disk_full)
    with caplog.at_level(logging.ERROR, logger="mailgate.deliverd"):
        agent.reload(b"[server]\nhostname = \"new\"\n")
    assert told == [] and "keeps its config" in caplog.text
    assert (tmp_path / "config.running.toml").read_bytes() == b"[server]\n"
