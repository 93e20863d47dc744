# Two commands do all the set-up: both create .venv and install the project if missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: demo test status clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed  ## the whole graph on the embedded default (synthetic source, local Ray, W&B offline)
	$(VENV)/bin/spacetime run $(ARGS)

test: $(VENV)/.installed  ## the test suite
	$(PY) -m pytest -q $(ARGS)

status: $(VENV)/.installed
	$(VENV)/bin/spacetime status $(ARGS)

clean:
	rm -rf outputs
