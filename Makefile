# Both targets set up .venv first (idempotent; 2-5 minutes on a fresh machine).
.PHONY: setup demo test test-fast docs

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/rayllm demo

test: setup
	.venv/bin/python -m pytest tests --durations=15

test-fast: setup
	.venv/bin/python -m pytest tests/unit

docs: setup
	.venv/bin/python -m rayllm.config.docs --write
