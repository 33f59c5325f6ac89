# The two commands: `make run` and `make test`. Everything they need is installed from here.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test lint typecheck pytest bench proto clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[torch,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/moc-node run

lint: $(STAMP)
	$(BIN)/ruff check moc_node actors cluster transports tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/inference.py --quick

# Regenerate the gRPC code committed under transports/grpc_gen/ after editing proto/*.proto
# (tests/transports/test_grpc_stubs.py fails while it is stale).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache
