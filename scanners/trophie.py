"""Trophie, the Trend Micro VSAPI daemon front-end (by Sophie's author).

Same unix-socket line protocol as Sophie (path + newline in; ``0``,
``1:NAME`` or ``-1:TEXT`` back), as used by MIMEDefang's
``item_contains_virus_trophie`` and File::VirusScan's
``Engine::Daemon::Trend::Trophie``.
"""

from __future__ import annotations

from scanners.sophie import PathLineScanner


class TrophieScanner(PathLineScanner):
    engine = "trophie"
