"""A tiny in-memory TrackingStore for the console's unit tests: the same
interface as monitor/tracking.py's, over lists, so page and action tests do
not depend on the SQL store (the browser test uses the real one)."""

from __future__ import annotations

import threading
from collections import Counter


class MemoryStore:
    def __init__(self):
        self.messages: dict[str, dict] = {}
        self.quarantine: dict[str, dict] = {}
        self.audits: list[dict] = []
        self.labels: dict[str, str] = {}
        self.lock = threading.Lock()

    def add(self, **m) -> dict:
        m.setdefault("recipients", [])
        m.setdefault("symbols", [])
        m.setdefault("deliveries", [])
        m.setdefault("events", [])
        m.setdefault("audit", [])
        for k in ("client", "sender", "subject", "reply", "helo", "tls", "auth_user", "message_id"):
            m.setdefault(k, "")
        m.setdefault("score", 0.0)
        m.setdefault("required", 5.0)
        m.setdefault("size", 0)
        with self.lock:
            self.messages[m["queue_id"]] = m
        return m

    def search(self, *, since=None, until=None, queue_id=None, message_id=None, sender=None, recipient=None,
               client=None, action=None, text=None, limit=100, offset=0):
        out = []
        for m in sorted(self.messages.values(), key=lambda m: -m["ts"]):
            if since is not None and m["ts"] < since or until is not None and m["ts"] > until:
                continue
            if queue_id and m["queue_id"] != queue_id or message_id and m["message_id"] != message_id:
                continue
            if sender and sender.lower() not in m["sender"].lower() or client and m["client"] != client:
                continue
            if recipient and not any(recipient.lower() in r.lower() for r in m["recipients"]):
                continue
            if action and m["action"] != action:
                continue
            if text and text.lower() not in (m["subject"] + " " + m["reply"]).lower():
                continue
            out.append({k: m[k] for k in ("queue_id", "ts", "client", "sender", "recipients", "subject", "score",
                                          "action", "reply")})
        return out[offset:offset + limit]

    def message(self, queue_id):
        return self.messages.get(queue_id)

    def dashboard(self, since, until):
        rows = [m for m in self.messages.values() if since <= m["ts"] <= until]
        per_hour = Counter((int(m["ts"] // 3600 * 3600), m["action"]) for m in rows)
        symbols = Counter(s["name"] for m in rows for s in m["symbols"])
        refused = [m for m in rows if m["action"] in ("reject", "refused")]
        return {"per_hour": [{"hour_ts": h, "action": a, "count": n} for (h, a), n in sorted(per_hour.items())],
                "top_symbols": symbols.most_common(10),
                "top_refused_clients": Counter(m["client"] for m in refused).most_common(10),
                "top_refused_sender_domains": Counter(m["sender"].rpartition("@")[2] for m in refused).most_common(10),
                "totals": dict(Counter(m["action"] for m in rows))}

    def quarantine_items(self, *, recipient=None, since=None, limit=100, offset=0):
        items = sorted(self.quarantine.values(), key=lambda i: -i["ts"])
        if recipient:
            items = [i for i in items if recipient in i["recipients"]]
        return items[offset:offset + limit]

    def verdicts(self, since, until):
        return [(m["queue_id"], m["score"], m["action"], self.labels.get(m["queue_id"]))
                for m in self.messages.values() if since <= m["ts"] <= until]

    def audit(self, *, since=None, limit=100):
        return list(reversed(self.audits))[:limit]

    # what the tracking store's event subscriber does, as far as these tests need it
    def hear(self, event) -> None:
        from gateway.events import AdminAction, Learned, Released

        if isinstance(event, AdminAction):
            self.audits.append({"ts": event.ts, "actor": event.actor, "action": event.action,
                                "target": event.target, "detail": event.detail, "source_ip": event.source_ip})
        elif isinstance(event, Released):
            self.quarantine.pop(event.queue_id, None)
            if event.learned_ham:
                self.labels[event.queue_id] = "ham"
        elif isinstance(event, Learned):
            self.labels[event.queue_id] = event.label
