# MailGate: `make run` starts the gateway on an embedded default config,
# `make test` installs everything the suite needs and runs it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test system-deps bench clean lint screenshots

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: install
	@echo "Mail Monitor (web console): http://127.0.0.1:8025/ ([web] listen in the config)"
	@echo "  first admin: $(BIN)/mailgate web adduser NAME   (then log in; --role viewer for read-only users)"
	$(BIN)/mailgate run

# the Mail Monitor's pages in headless Chromium, saved for the README
screenshots: install system-deps
	MAILGATE_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q -p no:cacheprovider tests/monitor/test_browser.py

# Debian packages the integration tests start for real (clamd, rbldnsd, DNS
# servers, slapd, c-icap, postfix's smtp-sink/smtp-source, swaks).
system-deps:
	sh tools/install-system-deps.sh

test: install system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: install system-deps
	$(BIN)/python -m tools.bench

clean:
	rm -rf $(VENV) var build *.egg-info
