# Two entry points (README): `make demo` runs the main job, `make test` the
# tests. Both create the virtualenv on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test files run in this many processes (one per core on CI's 2 cores;
# XLA compiles single-threaded, and most of the suite's time is compiles).
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m boxseg_jax.main --config=configs/demo.py --workdir=out/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/maskcut.py

clean:
	rm -rf $(VENV) out
