"""A real c-icap on loopback with its virus_scan service in front of our
clamd (Debian packages c-icap and libc-icap-mod-virus-scan).

The service is reachable as ``avscan`` (an alias of virus_scan with
``allow204=on``, so a clean object gets 204).  c-icap runs in the foreground
(``-N``) as our child and is stopped at teardown.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from tests.support.ports import free_port
from tests.support.programs import stop_process


def find_module_dir() -> Optional[str]:
    for d in glob.glob("/usr/lib/*/c_icap") + ["/usr/lib/c_icap", "/usr/local/lib/c_icap"]:
        if os.path.exists(os.path.join(d, "virus_scan.so")) and os.path.exists(os.path.join(d, "clamd_mod.so")):
            return d
    return None


def icap_options_ok(port: int, service: str = "avscan") -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"OPTIONS icap://127.0.0.1:{port}/{service} ICAP/1.0\r\nHost: 127.0.0.1\r\n"
                      "Encapsulated: null-body=0\r\n\r\n".encode())
            return s.recv(64).startswith(b"ICAP/1.0 200")
    except OSError:
        return False


@dataclass
class CIcap:
    dir: str
    port: int
    proc: Optional[subprocess.Popen] = None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)


def start_c_icap(base_dir: str, clamd_socket: str, binary: str = "c-icap") -> CIcap:
    modules = find_module_dir()
    if modules is None:
        raise RuntimeError("c-icap's virus_scan/clamd_mod modules are missing (libc-icap-mod-virus-scan)")
    os.makedirs(os.path.join(base_dir, "tmp"), exist_ok=True)
    os.chmod(os.path.join(base_dir, "tmp"), 0o1777)
    port = free_port()
    conf = os.path.join(base_dir, "c-icap.conf")
    magic = "/etc/c-icap/c-icap.magic"
    templates = "/usr/share/c_icap/templates/"
    with open(conf, "w") as f:
        f.write(
            f"PidFile {base_dir}/c-icap.pid\n"
            f"CommandsSocket {base_dir}/c-icap.ctl\n"
            "Timeout 60\nMaxKeepAliveRequests 100\nKeepAliveTimeout 60\n"
            "StartServers 1\nMaxServers 2\nMinSpareThreads 2\nMaxSpareThreads 8\nThreadsPerChild 8\n"
            "MaxRequestsPerChild 0\n"
            f"Port 127.0.0.1:{port}\n"
            "ServerName mailgate-test-icap\n"
            f"TmpDir {base_dir}/tmp\n"
            "MaxMemObject 131072\nDebugLevel 1\nPipelining on\n"
            f"ModulesDir {modules}\nServicesDir {modules}\n"
            f"TemplateDir {templates}\nTemplateDefaultLanguage en\n"
            + (f"LoadMagicFile {magic}\n" if os.path.exists(magic) else "")
            + f"ServerLog {base_dir}/server.log\nAccessLog {base_dir}/access.log\n"
            "Module common clamd_mod.so\n"
            f"clamd_mod.ClamdSocket {clamd_socket}\n"
            "Service antivirus_module virus_scan.so\n"
            "ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple\n"
            "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE\n"
            "virus_scan.SendPercentData 5\nvirus_scan.StartSendPercentDataAfter 2M\n"
            "virus_scan.MaxObjectSize 50M\nvirus_scan.DefaultEngine clamd\nvirus_scan.PassOnError off\n"
        )
        if os.geteuid() == 0:
            f.write("User root\nGroup root\n")
    proc = subprocess.Popen([binary, "-N", "-f", conf], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = CIcap(base_dir, port, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if icap_options_ok(port):
            return server
        if proc.poll() is not None:
            log = ""
            try:
                log = open(os.path.join(base_dir, "server.log")).read()[-500:]
            except OSError:
                pass
            raise RuntimeError(f"c-icap exited with {proc.returncode}: {log}")
        time.sleep(0.05)
    server.stop()
    raise RuntimeError("c-icap did not answer OPTIONS within 30s")
