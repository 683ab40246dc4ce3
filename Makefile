# Two commands on a fresh machine: `make demo` runs the offline quickstart, `make test` runs the tests.
# Both create and fill the virtual environment themselves.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedtui-installed

.PHONY: install bytecode demo test console clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,report,serve,files,flower,tensorboard,mlflow,wandb]'
	touch $(STAMP)

# Bytecode for the source tree, as pip writes it for an installed package: a run then skips compiling ~90
# modules (60 ms of every start) even where PYTHONDONTWRITEBYTECODE is set. Up to date, it takes 40 ms.
bytecode: $(STAMP)
	$(PY) -m compileall -q engine fedtui

install: $(STAMP)

demo: bytecode
	$(VENV)/bin/fedtui run presets/quickstart.toml

test: $(STAMP)
	$(PY) -m pytest -q

console: bytecode
	$(VENV)/bin/fedtui presets/quickstart.toml

clean-venv:
	rm -rf $(VENV)
