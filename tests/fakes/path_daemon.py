"""Stand-in for the Sophie (Sophos) and Trophie (Trend) scanning daemons.

Usage: ``path_daemon.py sophie|trophie SOCKET_PATH``

Listens on a unix socket.  Per connection it reads one line holding an
absolute file path, scans that file for the test signatures and answers one
line, as those daemons do: ``0`` clean, ``1:NAME`` virus, ``-1:TEXT`` error
(a missing/unreadable file, or ``FAKE-AV-TRIGGER-ERROR`` in the file).
``FAKE-AV-TRIGGER-HANG`` makes it never answer.  Stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MARKER = b"MAILGATE-TEST-VIRUS-MARKER-7f3a9c"
NAMES = {"sophie": ("EICAR-AV-Test", "Mal/MailGate-A"), "trophie": ("Eicar_test_file", "TROJ_MAILGATE.A")}


def answer(flavour: str, path: str) -> bytes:
    if not path.startswith("/"):
        return b"-1:path is not absolute\n"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"-1:{e.strerror}\n".encode()
    if b"FAKE-AV-TRIGGER-HANG" in data:
        threading.Event().wait()
    if b"FAKE-AV-TRIGGER-ERROR" in data:
        return b"-1:engine error\n"
    eicar_name, marker_name = NAMES[flavour]
    if EICAR in data:
        return f"1:{eicar_name}\n".encode()
    if MARKER in data:
        return f"1:{marker_name}\n".encode()
    return b"0\n"


def serve(conn: socket.socket, flavour: str) -> None:
    with conn:
        line = b""
        while b"\n" not in line and len(line) < 4096:
            chunk = conn.recv(4096)
            if not chunk:
                break
            line += chunk
        conn.sendall(answer(flavour, line.split(b"\n", 1)[0].decode(errors="replace").strip()))


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in NAMES:
        print("usage: path_daemon.py sophie|trophie SOCKET_PATH", file=sys.stderr)
        return 64
    flavour, path = argv[1], argv[2]
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # the socket appears under its real name only once it accepts connections
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, flavour), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
