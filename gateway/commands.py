"""The gateway's own subcommands: run, check-config, score, queue, quarantine."""

from __future__ import annotations

import datetime
import getpass
import json
import os
import signal
import sys
import time

from gateway.errors import MailGateError


def cmd_run(args) -> int:
    from gateway import config as cfg
    from gateway.service import run

    path = cfg.find_config_path(args.config)
    config, source = cfg.load_with_source(path)
    return run(config, path, source)


def cmd_deliver(args) -> int:
    """The delivery process `mailgate run` starts; not for people to run."""
    from gateway import config as cfg
    from gateway.cli import load_config
    from gateway.deliverd import run

    return run(load_config(args), cfg.find_config_path(args.config))


def cmd_check_config(args) -> int:
    from gateway import config as cfg
    from gateway.auth import users_of
    from gateway.plugins import discover, select
    from gateway.service import server_tls

    path = cfg.find_config_path(args.config)
    config = cfg.load(path)
    cfg.check_files(config, path or "(embedded default)")  # as `run` and a reload do
    server_tls(config.server)  # and their content must be usable, as `run` needs it
    users_of(config.auth)
    checks = select(discover(), config)
    print(f"config ok: listen={','.join(str(l) for l in config.server.listen)} "
          f"domains={','.join(config.relay.domains) or '-'} checks={','.join(c.name for c in checks)}")
    return 0


# --- score -----------------------------------------------------------------


def cmd_score(args) -> int:
    """Runs the DATA-stage checks offline on message files."""
    from gateway.cli import load_config
    from gateway.service import install_reactor

    config = load_config(args)
    reactor = install_reactor()
    from twisted.internet import task

    status = {"code": 0}

    def main(_reactor):
        return _score_all(config, reactor, args).addCallback(lambda n: status.update(code=0 if n else 1))

    try:
        task.react(lambda r: main(r))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code)
    return status["code"]


def _score_all(config, reactor, args):
    from twisted.internet import defer
    from twisted.internet.threads import deferToThread

    from gateway.plugins import Services, discover
    from gateway.records import Envelope, Message, Recipient, Session, Stage, Transaction
    from gateway.resolver import Resolver
    from gateway.runtime import build_runtime
    from gateway.sources import iter_messages

    services = Services(reactor=reactor, resolver=Resolver.from_config(config.dns), run_in_thread=deferToThread)
    runtime = build_runtime(config, discover(), services)

    @defer.inlineCallbacks
    def go():
        count = 0
        for label, raw in iter_messages(args.paths):
            raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if raw.startswith(b"From "):  # mbox envelope line, not a header
                raw = raw.split(b"\r\n", 1)[1] if b"\r\n" in raw else b""
            msg = Message(raw, config.server.max_mime_depth)
            sender = (msg.parsed.get("Return-Path") or "").strip("<> ")
            session = Session(queue_id="offline", peer_ip="127.0.0.1")
            env = Envelope(queue_id="offline", sender=sender,
                           recipients=[Recipient("postmaster@localhost", "localhost")])
            records = yield runtime.pipeline.run(Stage.DATA, Transaction(session, env, msg))
            verdict = runtime.scorer.decide(records)
            count += 1
            if args.json:
                print(json.dumps({
                    "path": label, "score": verdict.score, "action": verdict.action.value,
                    "symbols": verdict.symbols, "required": verdict.required,
                    "tests": {r.symbol: r.score for r in verdict.results},
                    "failed": [f"{f.check}: {f.reason}" for f in verdict.failures],
                }), flush=True)
            else:
                print(f"{label}\t{verdict.score:.1f}\t{verdict.action.value}\t{','.join(verdict.symbols) or '-'}",
                      flush=True)
        return count

    return go()


# --- queue -------------------------------------------------------------------


def _spool(args):
    from gateway.cli import load_config
    from gateway.spool import Spool

    config = load_config(args)
    if not os.path.isdir(config.queue.dir):
        raise MailGateError(f"queue.dir = {config.queue.dir!r}: no such directory")
    return Spool(config.queue.dir)


def _when(ts: float) -> str:
    if not ts:
        return "now"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _need_id(args) -> None:
    if not args.id:
        raise MailGateError(f"{args.command} {args.action}: needs a queue ID")


def _signal_gateway(spool, sig) -> bool:
    try:
        with open(os.path.join(spool.root, "mailgate.pid")) as f:
            os.kill(int(f.read().strip()), sig)
        return True
    except (OSError, ValueError):
        return False


_DONE = {"delete": "deleted", "hold": "held", "release": "released"}


def cmd_queue(args) -> int:
    spool = _spool(args)
    action = args.action
    if action == "list":
        entries = list(spool.entries())
        for e in entries:
            state = "HELD" if e.held else f"next={_when(e.next_try)}"
            print(f"{e.queue_id} {_when(e.arrival)} size={e.size} from=<{e.sender}> attempts={e.attempts} {state}")
            for r in e.recipients:
                print(f"    <{r.address}> {r.status}{' ' + r.reply if r.reply else ''}")
        print(f"-- {len(entries)} message(s) in queue")
        return 0
    if action == "flush":
        ids = []
        for listed in spool.entries():
            with spool.locked(listed.queue_id) as e:
                if e is not None and not e.held:
                    e.next_try = 0
                    spool.update(e)
                    ids.append(e.queue_id)
        told = _signal_gateway(spool, signal.SIGUSR1)
        print(f"flush: {len(ids)} message(s){'' if told else ' (gateway not running; they go at its next start)'}")
        return 0
    _need_id(args)
    entry = spool.entry(args.id)
    if entry is None:
        raise MailGateError(f"queue {action}: no message {args.id!r} in the queue")
    if action == "show":
        print(json.dumps(json.loads(entry.to_json()), indent=2))
        print()
        sys.stdout.buffer.write(spool.read(args.id))
        return 0
    # under the message's lock: a delivery attempt finishing now keeps this change
    with spool.locked(args.id) as entry:
        if entry is None:
            raise MailGateError(f"queue {action}: message {args.id!r} left the queue meanwhile")
        if action == "delete":
            spool.remove(args.id)
        elif action == "hold":
            entry.held = True
            spool.update(entry)
        elif action == "release":
            entry.held, entry.next_try = False, 0
            spool.update(entry)
    if action == "release":
        _signal_gateway(spool, signal.SIGUSR1)
    print(f"{_DONE[action]} {args.id}")
    return 0


# --- quarantine ----------------------------------------------------------------


def cmd_quarantine(args) -> int:
    from gateway.spool import QueueEntry, RecipientState, new_queue_id

    spool = _spool(args)
    action = args.action
    if action == "list":
        items = spool.quarantine_list()
        for m in items:
            print(f"{m['queue_id']} {_when(m['arrival'])} score={m['score']} from=<{m['sender']}> "
                  f"to={','.join(m['recipients'])} reasons={'; '.join(m.get('reasons') or []) or '-'}")
        print(f"-- {len(items)} message(s) in quarantine")
        return 0
    _need_id(args)
    meta = spool.quarantine_meta(args.id)
    if meta is None:
        raise MailGateError(f"quarantine {action}: no message {args.id!r} in quarantine")
    if action == "show":
        print(json.dumps(meta, indent=2))
        print()
        sys.stdout.buffer.write(spool.quarantine_read(args.id))
        return 0
    if action == "delete":
        spool.quarantine_remove(args.id)
        print(f"deleted {args.id} from quarantine")
        return 0
    # release: deliver unchanged but for one header naming who released it
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
    data = f"X-MailGate-Released: by {who} on {stamp} from quarantine id {args.id}\r\n".encode() + \
        spool.quarantine_read(args.id)
    entry = QueueEntry(queue_id=new_queue_id(), sender=meta["sender"],
                       recipients=[RecipientState(a) for a in meta["recipients"]], arrival=time.time(),
                       client=meta.get("client", ""), helo=meta.get("helo", ""), size=len(data))
    spool.store(entry, data)
    spool.quarantine_remove(args.id)
    told = _signal_gateway(spool, signal.SIGUSR1)
    print(f"released {args.id} as queue id {entry.queue_id}{'' if told else ' (delivered at the next start)'}")
    return 0


def cmd_passwd(args) -> int:
    from gateway.auth import hash_password

    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        raise MailGateError("empty password")
    print(f"{args.user}:{hash_password(password)}")
    return 0


def register_commands(sub, parent) -> None:
    p = sub.add_parser("run", parents=[parent], help="run the gateway in the foreground")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("deliver", parents=[parent], help="(internal) the delivery process of `run`")
    p.set_defaults(func=cmd_deliver)
    p = sub.add_parser("check-config", parents=[parent], help="validate the config and exit")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("score", parents=[parent], help="score message files offline")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("paths", nargs="+", metavar="PATH", help="file, Maildir, mbox or directory")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("queue", parents=[parent], help="show and manage the delivery queue")
    p.add_argument("action", choices=["list", "show", "flush", "delete", "hold", "release"])
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_queue)
    p = sub.add_parser("quarantine", parents=[parent], help="show and manage quarantined messages")
    p.add_argument("action", choices=["list", "show", "release", "delete"])
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_quarantine)
    p = sub.add_parser("passwd", parents=[parent], help="print a users-file line for SMTP AUTH")
    p.add_argument("user")
    p.set_defaults(func=cmd_passwd)
