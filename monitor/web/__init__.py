"""The web Mail Monitor: the console `mailgate run` serves on ``[web] listen``.

Only the config section is named here: ``gateway.plugins.discover`` imports
this package to find it, and must not pay for Jinja2 and the pages.
"""

from monitor.web.settings import WebSettings

SECTIONS = {"web": WebSettings}
