# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test codegen clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/holdfast serve

# Installs PostgreSQL / Redis from Debian's packages when missing; the tests
# start their own servers (tests/backends.py) and stop them afterwards.
# The project's own contracts are linted as a user's CI would; `holdfast
# doctor` against PostgreSQL and Redis runs inside the suite (test_doctor.py).
test: $(STAMP)
	bash tests/ensure-packages.sh
	$(VENV)/bin/holdfast lint --format github protos
	$(VENV)/bin/holdfast doctor --store "sqlite:///$$(mktemp -d)/doctor.db" --snapshot memory://
	$(VENV)/bin/python -m tests.typecheck
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

codegen: $(STAMP)
	$(VENV)/bin/holdfast codegen

clean:
	rm -rf $(VENV) holdfast.db holdfast.db-wal holdfast.db-shm
