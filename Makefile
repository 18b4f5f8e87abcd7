# Every target sets up (or checks, in seconds) the environment in .venv first.
# Usage: make demo | make test | make lint | make env | make gpu-wheels
#        make test PYTEST_ARGS='-k environment -x'

VENV_PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env test demo lint format gpu-wheels

env:
	bash tools/setup_env.sh

test: env
	$(VENV_PY) -m pytest tests $(PYTEST_ARGS)

demo: env
	$(VENV_PY) tools/demo.py

lint: env
	$(VENV_PY) -m ruff check .

# Rewrites files: ruff's formatter (settings in pyproject.toml), then the fixable lint findings.
format: env
	$(VENV_PY) -m ruff format .
	$(VENV_PY) -m ruff check --fix .

# The wheels that tools/gpu_check.sh installs on a GPU machine without network, into .whl/.
gpu-wheels: env
	bash tools/gpu_wheels.sh
