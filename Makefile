# The two commands a user types: `make run` and `make test`. Both create the
# virtual environment in .venv/ first when it is missing or out of date.

VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test install

$(STAMP): setup.cfg pyproject.toml scripts/bootstrap
	scripts/bootstrap

## run: start the whole manager under supervisord, in the foreground
run: $(STAMP)
	exec $(VENV)/bin/python -m services.launch

## test: run the whole test suite against private PostgreSQL and Redis servers
test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

## install: install under PREFIX (default /opt/agent-manager) with a systemd unit; as root, or with DESTDIR
install:
	scripts/install

.PHONY: bench bench-quick

## bench: run every benchmark (up to 10,000 simulated agents, about 7 minutes) and update docs/benchmarks.md
bench: $(STAMP)
	$(VENV)/bin/python -m bench.run --set standard --write docs/benchmarks.md

## bench-quick: run a smaller benchmark set (500 agents, under 2 minutes) and print the results
bench-quick: $(STAMP)
	$(VENV)/bin/python -m bench.run --set quick
