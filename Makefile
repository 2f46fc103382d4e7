# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
# Both set up everything on a fresh machine; set-up is skipped when nothing it depends on changed.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prmkd-installed
# the machine's pip config points at local mirrors that may not exist; their warnings are noise
PIP := $(PY) -m pip install -q --disable-pip-version-check
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install demo test bench clean

$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel ninja $(QUIET)
	$(PIP) -r requirements.txt $(QUIET)
	# torchrec's wheel requires the CUDA fbgemm-gpu; fbgemm-gpu-cpu (in requirements.txt) replaces it
	$(PIP) --no-deps torchrec==1.8.0 $(QUIET)
	# builds the C++ ops (csrc/); needs torch present, hence no build isolation
	$(PIP) --no-build-isolation --no-deps -e . $(QUIET)
	$(PY) -c "import prmkd_dist, torchrec, deepspeed, triton, pyarrow; print('prmkd-dist installed:', prmkd_dist.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/prmkd-dist quickstart

test: install
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info prmkd_dist/_C*.so
