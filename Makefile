# The two commands of the README: `make demo` runs the main job, `make test` the tests.
# Both start with `make setup`, which installs whatever a fresh machine lacks and nothing else.

VENV   := .venv
PYTEST := $(VENV)/bin/pytest

.PHONY: setup lint test test-matrix demo clean

setup:
	@bash scripts/setup.sh

# Import rules: the contracts in .importlinter; ruff's banned imports (TID251) in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PYTEST) -q -p no:cacheprovider tests/test_architecture.py

# Default suite: PostgreSQL 13, 15 and 17; other majors run in `make test-matrix`.
test: lint
	$(PYTEST) -m "not matrix"

test-matrix: setup
	$(PYTEST) -m matrix

demo: setup
	$(VENV)/bin/python scripts/demo.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
