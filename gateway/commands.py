"""The gateway's own subcommands: run, check-config, score, queue, quarantine."""

from __future__ import annotations

import datetime
import getpass
import json
import os
import signal
import sys

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
    from gateway.plugins import check_scores, discover, select, symbol_table
    from gateway.service import server_tls

    path = cfg.find_config_path(args.config)
    config = cfg.load(path)
    cfg.check_files(config, path or "(embedded default)")  # as `run` and a reload do
    server_tls(config.server)  # and their content must be usable, as `run` needs it
    users_of(config.auth)
    catalogue = discover()
    checks = select(catalogue, config)
    # a [scores] key naming no declared symbol is a typo that would silently score nothing
    check_scores(config, symbol_table(catalogue, config), path or "(embedded default)")
    print(f"config ok: listen={','.join(str(l) for l in config.server.listen)} "
          f"domains={','.join(config.relay.domains) or '-'} checks={','.join(c.name for c in checks)}")
    return 0


# --- score -----------------------------------------------------------------


def cmd_score(args) -> int:
    """Runs the DATA-stage checks offline on message files."""
    from gateway.cli import load_config
    from gateway.service import install_reactor
    from rules.sa.session_facts import check_options

    check_options(args.client_ip, args.rcpt)  # a bad option is refused before any work
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
    from rules.sa.received import INFERRED
    from rules.sa.session_facts import session_facts

    services = Services(reactor=reactor, resolver=Resolver.from_config(config.dns), run_in_thread=deferToThread)
    runtime = build_runtime(config, discover(), services)
    rules = getattr(config, "rules", None)
    trust = rules.trust() if rules is not None else INFERRED

    @defer.inlineCallbacks
    def go():
        count = 0
        for label, raw in iter_messages(args.paths):
            raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if raw.startswith(b"From "):  # mbox envelope line, not a header
                raw = raw.split(b"\r\n", 1)[1] if b"\r\n" in raw else b""
            msg = Message(raw, config.server.max_mime_depth)
            # the session the file would have had at our gateway (its Received
            # chain), not loopback: see rules/sa/session_facts.py
            facts = session_facts(raw, trust, client_ip=args.client_ip, helo=args.helo, rcpt=args.rcpt)
            session = Session(queue_id="offline", peer_ip=facts.client_ip, helo=facts.helo,
                              esmtp=True)
            env = Envelope(queue_id="offline", sender=facts.sender,
                           recipients=[Recipient(facts.rcpt, facts.rcpt.rpartition("@")[2].lower().rstrip("."))])
            records = yield runtime.pipeline.run(Stage.DATA, Transaction(session, env, msg))
            verdict = runtime.scorer.decide(records)
            count += 1
            if args.json:
                print(json.dumps({
                    "path": label, "score": verdict.score, "action": verdict.action.value,
                    "symbols": verdict.symbols, "required": verdict.required,
                    "tests": {r.symbol: r.score for r in verdict.results},
                    "failed": [f"{f.check}: {f.reason}" for f in verdict.failures],
                    "session": {"client_ip": facts.client_ip, "client_rdns": facts.client_rdns,
                                "helo": facts.helo, "from": facts.client_source, "rcpt": facts.rcpt,
                                "rcpt_from": facts.rcpt_source, "sender": facts.sender},
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
    # changes go through the monitor's service layer: audited and tracked like the console's
    told: list = []
    actions = _actions(args, spool, told)
    if action == "flush":
        done = actions.queue_flush(_actor())
        print(f"{done.text}{'' if all(told) else ' (gateway not running; they go at its next start)'}")
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
    change = {"delete": actions.queue_delete, "hold": actions.queue_hold, "release": actions.queue_release}
    print(change[action](args.id, _actor()).text)
    return 0


# --- quarantine ----------------------------------------------------------------


def _actions(args, spool, told: list):
    from gateway.cli import load_config
    from monitor.actions import cli_actions

    return cli_actions(load_config(args), spool, wake=lambda: told.append(_signal_gateway(spool, signal.SIGUSR1)))


def _actor() -> str:
    from monitor.actions import cli_actor

    return cli_actor()


def cmd_quarantine(args) -> int:
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
    # release (without our tag and X-Spam-* headers), delete and learn: through the
    # monitor's service layer, audited and tracked like the console's
    told: list = []
    actions = _actions(args, spool, told)
    if action == "delete":
        print(actions.delete(args.id, _actor()).text)
        return 0
    if action in ("learn-spam", "learn-ham"):
        print(actions.learn(args.id, _actor(), action[len("learn-"):]).text)
        return 0
    done = actions.release(args.id, _actor(), learn_ham=action == "release-ham")
    print(f"{done.text}{'' if all(told) else ' (delivered at the next start)'}")
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
    p.add_argument("--client-ip", metavar="IP",
                   help="the SMTP client (default: the hop that brought the message in, from its Received headers)")
    p.add_argument("--helo", metavar="NAME", help="the client's HELO (default: that hop's)")
    p.add_argument("--rcpt", metavar="ADDRESS",
                   help="the recipient (default: X-Original-To, else Delivered-To, else To)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="file, Maildir, mbox or directory")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("queue", parents=[parent], help="show and manage the delivery queue")
    p.add_argument("action", choices=["list", "show", "flush", "delete", "hold", "release"])
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_queue)
    p = sub.add_parser("quarantine", parents=[parent], help="show and manage quarantined messages")
    p.add_argument("action", choices=["list", "show", "release", "release-ham", "delete", "learn-spam",
                                      "learn-ham"])
    p.add_argument("id", nargs="?")
    p.set_defaults(func=cmd_quarantine)
    p = sub.add_parser("passwd", parents=[parent], help="print a users-file line for SMTP AUTH")
    p.add_argument("user")
    p.set_defaults(func=cmd_passwd)
