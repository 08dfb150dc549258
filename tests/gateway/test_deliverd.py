"""The delivery process: supervised by `mailgate run`, never orphaned."""

import os
import signal
import subprocess
import time

import pytest

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


# -- per-destination delivery and a full disk, through a real `mailgate run` ----------------------

FAKES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fakes")


def established(port: int) -> int:
    """Connections the server side of 127.0.0.1:port has open (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "01")


def with_lines(gw, section: str, *lines: str) -> None:
    """Add keys to a section of the gateway's generated config (before it starts)."""
    text = gw.config_path.read_text()
    assert f"[{section}]\n" in text
    gw.config_path.write_text(text.replace(f"[{section}]\n", f"[{section}]\n" + "".join(f"{x}\n" for x in lines), 1))


@pytest.fixture
def hung_server():
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(FAKES, "silent_server.py"), "tcp", str(port)],
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_a_hung_next_hop_does_not_stop_delivery_to_others(mailgate, sink, hung_server):
    gw = mailgate(start=False, domains=("example.test", "hung.test"))
    with_lines(gw, "routes", f'"hung.test" = "smtp:[127.0.0.1]:{hung_server}"')
    # the hung server's sessions must outlive the test: what is delivered
    # meanwhile did not wait for them
    with_lines(gw, "queue", "delivery_concurrency = 50", "destination_concurrency = 20", 'helo_timeout = "10m"')
    gw.start()
    with gw.smtp() as c:
        for i in range(50):
            assert c.sendmail("alice@sender.test", [f"u{i}@hung.test"], HAM) == {}
    assert wait_until(lambda: established(hung_server) == 20, timeout=30), established(hung_server)
    assert send(gw) == {}  # to example.test: the sink
    assert sink.wait_for(1, timeout=60), gw.log()[-3000:]
    assert established(hung_server) == 20  # its own limit, never more
    assert "timeout after" not in gw.log()


@pytest.fixture
def small_disk(tmp_path):
    """Mounts a 20 MB tmpfs; yields its path; fill() takes every free byte, free() gives them back."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: mounting a tmpfs must work")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "gw0" / "queue"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)

    class Disk:
        path = mount
        filler = mount / "filler"

        def fill(self):
            with open(self.filler, "ab", buffering=0) as f:
                for size in (1 << 20, 4096, 1):
                    try:
                        while True:
                            f.write(b"\0" * size)
                    except OSError as e:
                        assert e.errno == 28

        def free(self):
            self.filler.unlink()

    yield Disk()
    if subprocess.run(["umount", str(mount)]).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=True)  # still busy: detach it now, free it when idle


def test_a_full_disk_during_a_deferral_does_not_strand_the_message(small_disk, mailgate, sink):
    # small_disk first: it is unmounted after the gateway has been stopped
    gw = mailgate(start=False)
    assert gw.queue_dir() == small_disk.path
    # the sweep is tested with task.Clock; here the failed write itself must leave a retry
    with_lines(gw, "queue", 'sweep_interval = "10m"')
    gw.start()
    sink.rcpt_reply = "451 4.3.0 try later"
    assert send(gw) == {}
    assert wait_until(lambda: "deferred=1" in gw.log())  # the first deferral is on disk
    small_disk.fill()
    assert wait_until(lambda: "cannot record the attempt: [Errno 28]" in gw.log()), gw.log()[-3000:]
    small_disk.free()
    sink.rcpt_reply = None
    assert sink.wait_for(1, timeout=30), gw.log()[-3000:]  # no SIGUSR1, no restart
    assert wait_until(lambda: not os.listdir(gw.queue_dir() / "messages"))
