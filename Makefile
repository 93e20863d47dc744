# Two commands do all the set-up: both create .venv and install the project if missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The venv's bin first on PATH: DeepSpeed JIT-builds its ops with whichever `ninja` PATH finds,
# and ninja 1.11 (Debian) and 1.13 (pip, a DeepSpeed dependency) each discard the other's build
# log, so processes with different PATHs (the test runner, Ray workers, a Ray job) would rebuild
# the cached ops in turn (~30-50 s each).
export PATH := $(abspath $(VENV))/bin:$(PATH)
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test status clean chromium

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m training.prebuild || echo "note: DeepSpeed's ops did not build now; they build on first use"
	touch $@

demo: $(VENV)/.installed  ## the whole graph on the embedded default (synthetic source, local Ray, W&B offline)
	$(VENV)/bin/spacetime run $(ARGS)

test: $(VENV)/.installed chromium  ## the test suite
	$(PY) -m pytest -q $(ARGS)

# The report test opens the page in headless Chromium (Debian's build decodes H.264). Installed
# when missing and we are root (CI); otherwise that one test is skipped and says why.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	  else echo "note: $(CHROMIUM) missing (not root): the report's browser test is skipped"; fi; \
	fi

status: $(VENV)/.installed
	$(VENV)/bin/spacetime status $(ARGS)

clean:
	rm -rf outputs
