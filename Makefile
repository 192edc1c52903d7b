# Two commands on a fresh machine with Python 3.11+ (README, "Quick start").
.PHONY: demo test

# The device install only (no torch) in its own environment, then the demo on the embedded toy model.
demo:
	python3 -m venv .venv-demo
	.venv-demo/bin/pip install -e .
	.venv-demo/bin/zoodip-edge demo --out zoodip-demo

# Exactly the README's set-up, then the linter and the README's test command (.ci/run runs this).
test:
	python3 -m venv .venv && . .venv/bin/activate && \
	pip install torch==2.13.0 && \
	pip install -e ".[export,eval,test]" && \
	ruff check . && \
	python -m pytest
