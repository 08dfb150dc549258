"""A real OpenLDAP slapd on loopback with a small test directory.

API::

    from tests.support.ldap import Slapd, ldap_user, slapd_server   # slapd_server: fixture

    with Slapd(tmp_path / "ldap", users=[ldap_user("alice", "alice@example.test",
                                                    proxy=["SMTP:alice@example.test", "smtp:ally@example.test"])]) as d:
        d.url            # "ldap://127.0.0.1:PORT"
        d.base           # "dc=example,dc=test"; users live under ou=people
        d.bind_dn, d.password   # a read-only service account (cn=reader,...)
        d.stop(); d.start()     # "directory down" inside a test; same port, same data

    def test_x(slapd_server):    # fixture: a started Slapd with alice and bob, stopped at teardown
        ...

The directory carries Active Directory's ``proxyAddresses`` (same OID, with
a case-insensitive equality rule so filters work as on AD), added to
inetOrgPerson entries through an auxiliary class.  Data is loaded with
``slapadd`` before slapd starts, so a start takes well under a second.
slapd runs in the foreground (``-d 0``) as a child of the test process and
as the current user (root here; it needs no privileges on a high port).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.support.ports import free_port
from tests.support.programs import require_program, stop_process

SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"

# proxyAddresses as AD defines it (1.2.840.113556.1.2.210), with an equality
# rule so that "(proxyAddresses=smtp:a@b)" matches "SMTP:a@b" as AD does.
AD_MAIL_SCHEMA = """\
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
objectclass ( 1.3.6.1.4.1.4203.666.11.99.1 NAME 'mailgateTestMailUser' SUP top AUXILIARY
    MAY ( proxyAddresses ) )
"""


def ldap_user(uid: str, mail: Optional[str] = None, proxy: tuple | list = ()) -> dict:
    return {"uid": uid, "mail": mail, "proxy": list(proxy)}


DEFAULT_USERS = [
    ldap_user("alice", "alice@example.test", ["SMTP:alice@example.test", "smtp:ally@example.test"]),
    ldap_user("bob", "bob@example.test"),
    ldap_user("carol", None, ["SMTP:carol@example.test"]),  # only a proxy address, no mail
]


class Slapd:
    def __init__(self, directory, users: Optional[list] = None, suffix: str = "dc=example,dc=test",
                 port: Optional[int] = None):
        self.program = require_program("slapd")
        self.slapadd = require_program("slapadd")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.base = suffix
        self.bind_dn = f"cn=reader,{suffix}"
        self.password = "reader-secret"
        self.users = DEFAULT_USERS if users is None else users
        self._proc: Optional[subprocess.Popen] = None
        self._loaded = False

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    def _config(self) -> Path:
        (self.dir / "ad-mail.schema").write_text(AD_MAIL_SCHEMA)
        (self.dir / "db").mkdir(exist_ok=True)
        conf = self.dir / "slapd.conf"
        conf.write_text(f"""\
include {SCHEMA_DIR}/core.schema
include {SCHEMA_DIR}/cosine.schema
include {SCHEMA_DIR}/inetorgperson.schema
include {self.dir}/ad-mail.schema
pidfile {self.dir}/slapd.pid
argsfile {self.dir}/slapd.args
modulepath {MODULE_DIR}
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{self.base}"
rootdn "cn=admin,{self.base}"
rootpw admin-secret
directory {self.dir}/db
index objectClass eq
index mail eq
index proxyAddresses eq
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{self.bind_dn}" read by * none
""")
        return conf

    def _ldif(self) -> str:
        dc = self.base.split(",")[0].split("=")[1]
        out = [f"dn: {self.base}\nobjectClass: dcObject\nobjectClass: organization\no: test\ndc: {dc}\n",
               f"dn: ou=people,{self.base}\nobjectClass: organizationalUnit\nou: people\n",
               f"dn: {self.bind_dn}\nobjectClass: person\nobjectClass: simpleSecurityObject\ncn: reader\n"
               f"sn: reader\nuserPassword: {self.password}\n"]
        for u in self.users:
            lines = [f"dn: uid={u['uid']},ou=people,{self.base}", "objectClass: inetOrgPerson",
                     "objectClass: mailgateTestMailUser", f"uid: {u['uid']}", f"cn: {u['uid']}", f"sn: {u['uid']}"]
            if u.get("mail"):
                lines.append(f"mail: {u['mail']}")
            lines += [f"proxyAddresses: {p}" for p in u.get("proxy", ())]
            out.append("\n".join(lines) + "\n")
        return "\n".join(out)

    def start(self) -> "Slapd":
        if self._proc is not None and self._proc.poll() is None:
            return self
        conf = self._config()
        if not self._loaded:
            ldif = self.dir / "data.ldif"
            ldif.write_text(self._ldif())
            res = subprocess.run([self.slapadd, "-f", str(conf), "-l", str(ldif)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"slapadd failed: {res.stderr.strip()}")
            self._loaded = True
        self._proc = subprocess.Popen([self.program, "-f", str(conf), "-h", f"{self.url}/", "-d", "0"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace")
                self._proc = None
                raise RuntimeError(f"slapd exited at start: {err.strip()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.03)
        self.stop()
        raise RuntimeError(f"slapd did not listen on {self.url}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        try:
            os.unlink(self.dir / "slapd.pid")
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Slapd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def slapd_server(tmp_path):
    server = Slapd(tmp_path / "slapd").start()
    try:
        yield server
    finally:
        server.stop()
