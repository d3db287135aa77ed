# The two commands a newcomer needs:
#   make quickstart   set up .venv, train a small model on generated data, export it, serve it
#   make test         set up .venv (with dev tools), start Redis if needed, run the tests
.PHONY: setup setup-dev quickstart test lint bench clean

setup:
	./scripts/setup.sh

setup-dev:
	./scripts/setup.sh dev

quickstart: setup
	.venv/bin/mdlora quickstart --out artifacts/quickstart

test: setup-dev
	./scripts/ensure-redis.sh
	.venv/bin/pytest $(PYTEST_ARGS)

lint: setup-dev
	.venv/bin/ruff check .
	.venv/bin/mypy mdlora benchmarks scripts tests

bench: setup-dev
	.venv/bin/python benchmarks/bench_routing.py

clean:
	rm -rf artifacts runs .pytest_cache .mypy_cache .ruff_cache
