# MailGate: `make run` starts the gateway on an embedded default config,
# `make test` installs everything the suite needs and runs it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test system-deps bench clean lint

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: install
	$(BIN)/mailgate run

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
