# Both targets set up .venv first (idempotent; 2-5 minutes on a fresh machine).
.PHONY: setup demo test test-fast docs

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/rayllm demo

# Unit tests on two processes (both cores; many wait on subprocesses, sockets or a browser); the real
# Ray/DeepSpeed/vLLM tests one at a time, sharing one Ray. Both run even if the first fails.
test: setup
	.venv/bin/python -m pytest tests/unit -n 2 --durations=10; unit=$$?; \
	.venv/bin/python -m pytest tests/ray tests/gpu --durations=15; real=$$?; \
	exit $$(( unit || real ))

test-fast: setup
	.venv/bin/python -m pytest tests/unit

docs: setup
	.venv/bin/python -m rayllm.config.docs --write
