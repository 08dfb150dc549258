"""Crash recovery under load: the service, the delivery process and the spool together.

Several client threads send a few hundred messages into a real `mailgate run`
while the test kills, with SIGKILL, the gateway (parent), its delivery process
(child) and both, restarting the gateway after each death of the parent.
Every message that got a 250 must reach the downstream at least once.  A
message delivered twice is allowed (at-least-once, as SMTP allows), but the
duplicates are counted and reported (``record_property("report", ...)``, shown
in the terminal summary by tests/conftest.py).

A message whose client saw no 250 (the connection died under it, or it was
refused while the gateway restarted) is retried under a new Message-ID; the
unacknowledged ones may or may not arrive, and nothing is asserted on them.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter

from tests.gateway.test_service import wait_until
from tests.support.gateway import alive

CLIENTS = 6
TOTAL = 300
IN_FLIGHT = 30  # messages allowed past each kill's point: the kill lands under load
# kills spread over the run; "parent-now" restarts the gateway at once, while
# the orphaned delivery process may still be finishing (the new one waits on
# the spool's lock); "parent" waits for the orphan to leave first
KILLS = ("parent", "child", "both", "child", "parent-now", "both")
SEND_BOUND = 150.0  # seconds the clients may take in all (a bound, not a measurement)
DRAIN_BOUND = 60.0  # seconds for the queue to empty after the last 250
SENDER, RCPT = "alice@sender.test", "bob@example.test"
MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)
QUEUED_AS = re.compile(rb"queued as (\w+)")


def body(message_id: str) -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: {RCPT}\r\nSubject: crash {message_id}\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{message_id}>\r\n"
            f"\r\nShall we meet at noon?\r\n\r\n-- \r\nAlice\r\n").encode()


class Clients:
    """CLIENTS threads sending TOTAL messages between them, one transaction at a
    time over a connection each keeps until the gateway drops it.  A message
    may be started only below ``allowed``, which the test raises a little past
    each kill's point, so that every kill lands while messages are in flight."""

    def __init__(self, host: str, port: int, deadline: float):
        self.host, self.port, self.deadline = host, port, deadline
        self.cond = threading.Condition()
        self.allowed = 0
        self.next_message = 0
        self.acked: dict[str, str] = {}  # Message-ID -> queue id from the 250
        self.tried: set[str] = set()
        self.errors: Counter = Counter()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True, name=f"client{n}")
                        for n in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def allow(self, n: int) -> None:
        with self.cond:
            self.allowed = max(self.allowed, min(n, TOTAL))
            self.cond.notify_all()

    def allow_one_more(self) -> None:
        with self.cond:
            self.allow(self.allowed + 1)

    def acked_ids(self) -> set[str]:
        with self.cond:
            return set(self.acked)

    def wait_acked(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.acked) >= n, timeout)

    def join(self, timeout: float) -> list[str]:
        """Names of the threads still running after ``timeout``."""
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _take(self):
        """The next message's number, None when all are taken or time is up."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.next_message < self.allowed or self.next_message >= TOTAL,
                                      max(0.0, self.deadline - time.monotonic())):
                return None
            if self.next_message >= TOTAL:
                return None
            self.next_message += 1
            return self.next_message - 1

    def _run(self, n: int) -> None:
        conn = None
        try:
            while (i := self._take()) is not None:
                for attempt in itertools.count():
                    if time.monotonic() > self.deadline:
                        return
                    mid = f"crash-{i}-{attempt}@sender.test"
                    try:
                        if conn is None:
                            conn = smtplib.SMTP(self.host, self.port, timeout=15)
                            conn.ehlo("client.sender.test")
                        with self.cond:
                            self.tried.add(mid)
                        code, reply = self._send(conn, mid)
                    except (smtplib.SMTPException, OSError) as e:  # killed under us, or not back yet
                        with self.cond:
                            self.errors[type(e).__name__] += 1
                        if conn is not None:
                            conn.close()
                            conn = None
                        time.sleep(0.1)
                        continue
                    if code == 250:
                        m = QUEUED_AS.search(reply)
                        with self.cond:
                            self.acked[mid] = m.group(1).decode() if m else "?"
                            self.cond.notify_all()
                        break
                    with self.cond:
                        self.errors[f"reply {code}"] += 1
                    time.sleep(0.1)
        finally:
            if conn is not None:
                conn.close()

    @staticmethod
    def _send(conn: smtplib.SMTP, mid: str) -> tuple[int, bytes]:
        for step in (lambda: conn.mail(SENDER), lambda: conn.rcpt(RCPT)):
            code, reply = step()
            if code != 250:
                conn.rset()
                return code, reply
        return conn.data(body(mid))  # the final reply (data() raises only when DATA gets no 354)


def delivered_ids(sink) -> Counter:
    counts: Counter = Counter()
    for m in list(sink.messages):
        head = m.data.split(b"\r\n\r\n", 1)[0]
        found = MESSAGE_ID.search(head)
        counts[found.group(1).decode() if found else "(no Message-ID)"] += 1
    return counts


def queued(gw) -> list[str]:
    return os.listdir(gw.queue_dir() / "messages")


def test_kill_9_under_load_delivers_every_acknowledged_message(mailgate, sink, record_property):
    started = time.monotonic()
    gw = mailgate()
    clients = Clients(gw.host, gw.port, deadline=started + SEND_BOUND)
    clients.start()

    def undelivered() -> int:
        return len(clients.acked_ids() - delivered_ids(sink).keys())

    def delivery_resumes(before: set[str]) -> bool:
        """A message acknowledged after ``before`` has arrived: the current
        delivery process works (an orphan still finishing never takes a new one).
        One more message is let through each time: a trickle until one arrives."""
        clients.allow_one_more()
        return wait_until(lambda: (clients.acked_ids() - before) & delivered_ids(sink).keys(), timeout=0.5,
                          step=0.05)

    done = []  # each kill, with the 250s given so far / how many of them were not downstream yet
    for k, what in enumerate(KILLS):
        assert wait_until(gw.delivery_pids, timeout=20), f"no delivery process\n{gw.log()[-3000:]}"
        pids = gw.delivery_pids()
        assert len(pids) == 1, f"delivery processes {pids}\n{gw.log()[-3000:]}"
        child = pids[0]
        before = clients.acked_ids()
        assert wait_until(lambda: delivery_resumes(before), timeout=30, step=0), \
            f"after kills {done}: delivery does not resume\n{gw.log()[-3000:]}"
        # let it catch up (not asserted: a loss is reported at the end, with the figures)
        wait_until(lambda: undelivered() == 0, timeout=5, step=0.05)
        # the kill comes at the target, while the next IN_FLIGHT messages are on their way
        target = (k + 1) * TOTAL // (len(KILLS) + 1)
        clients.allow(target + IN_FLIGHT)
        assert clients.wait_acked(target, timeout=60), \
            f"after kills {done}: only {len(clients.acked_ids())} of {target} acknowledged\n{gw.log()[-3000:]}"
        if what in ("child", "both"):
            os.kill(child, signal.SIGKILL)
        if what != "child":
            gw.kill()
        done.append(f"{what}@{len(clients.acked_ids())}/{undelivered()}")
        if what == "child":
            assert wait_until(lambda: gw.delivery_pids() and child not in gw.delivery_pids(), timeout=20), \
                f"the delivery process {child} was not replaced\n{gw.log()[-3000:]}"
            continue
        if what == "parent-now":
            gw.start()  # its delivery process waits on the spool's lock for the orphan
        # the orphan finishes the attempts under way and leaves
        assert wait_until(lambda: not alive(child), timeout=30), f"delivery process {child} outlived its parent"
        if what != "parent-now":
            gw.start()
    clients.allow(TOTAL)

    stuck = clients.join(timeout=max(1.0, started + SEND_BOUND - time.monotonic()) + 20)
    assert not stuck, f"clients still sending: {stuck}"
    with clients.cond:
        acked = dict(clients.acked)

    # every acknowledged message is in the spool, and leaves it only after the
    # sink's 250 (which the sink gives once it has stored the message)
    wait_until(lambda: not queued(gw), timeout=DRAIN_BOUND, step=0.2)
    counts = delivered_ids(sink)
    lost = sorted(set(acked) - set(counts))
    unacked = clients.tried - set(acked)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    report = (f"acknowledged={len(acked)}/{TOTAL} delivered={sum(counts.values())} "
              f"distinct={len(counts)} duplicates={duplicates} lost={len(lost)} "
              f"unacknowledged={len(unacked)} (of which delivered {len(unacked & set(counts))}) "
              f"kills={','.join(done)} client_errors={dict(clients.errors)} "
              f"seconds={time.monotonic() - started:.1f}")
    record_property("report", report)
    print(report)
    assert not lost, (f"{report}\nlost (Message-ID -> queue id): "
                      f"{[(m, acked[m]) for m in lost[:20]]}\nstill queued: {queued(gw)[:20]}")
    assert len(acked) == TOTAL, f"clients gave up: {report}"
    assert not queued(gw), f"the queue did not empty: {queued(gw)[:20]}\n{report}"
    assert set(counts) <= clients.tried, f"the sink got mail nobody sent: {set(counts) - clients.tried}"
