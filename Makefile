# Both targets set up .venv first (idempotent; 2-5 minutes on a fresh machine).
.PHONY: setup demo test test-fast docs

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/rayllm demo

# Unit tests on two processes (both cores; many wait on subprocesses, sockets or a browser); the real
# Ray/DeepSpeed/vLLM tests on two processes as well, a file at a time each (a file's tests share one
# Ray and its fixtures): one at a time they left a core idle half the time (0.9 core used on average,
# 29 min), two at a time 23 min on 2 cores. Both run even if the first fails.
test: setup
	.venv/bin/python -m pytest tests/unit -n 2 --durations=10; unit=$$?; \
	.venv/bin/python -m pytest tests/ray tests/gpu -n 2 --dist loadfile --durations=15; real=$$?; \
	exit $$(( unit || real ))

test-fast: setup
	.venv/bin/python -m pytest tests/unit

docs: setup
	.venv/bin/python -m rayllm.config.docs --write
