"""A scanner that hangs: accepts connections (unix socket or TCP), reads
whatever it is sent, and never answers.

Usage: ``silent_server.py unix PATH`` or ``silent_server.py tcp PORT``
Prints ``ready`` once listening.  Stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading


def swallow(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("unix", "tcp"):
        print("usage: silent_server.py unix PATH | tcp PORT", file=sys.stderr)
        return 64
    if argv[1] == "unix":
        if os.path.exists(argv[2]):
            os.unlink(argv[2])
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(argv[2])
    else:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", int(argv[2])))
    server.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("ready", flush=True)
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)  # keep it open: the client waits for an answer that never comes
        threading.Thread(target=swallow, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
