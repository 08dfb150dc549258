"""Anti-virus engine adapters behind one interface (scanners/base.py), the
"antivirus" and "banned_attachments" DATA checks, and ``mailgate
av-selftest``.  See docs/antivirus.md."""
