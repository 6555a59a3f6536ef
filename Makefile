# crystalmapping: `make demo` and `make test` each set up .venv on a fresh machine.
# Python 3.12 or 3.13 when the machine has one (on PATH, or installed by pyenv), else
# python3.11. Dask workers on CPython 3.11 can deadlock in distributed's
# profiler (python/cpython#116969); the package turns the profiler off there, 3.12+ is
# simply not affected. `make PYTHON=/path/to/python` chooses another.
PYTHON ?= $(shell for v in 3.12 3.13; do \
	  if python$$v -c '' >/dev/null 2>&1; then echo python$$v; exit 0; fi; \
	  root=$$(pyenv root 2>/dev/null) || continue; \
	  p=$$(ls -d $$root/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -n 1); \
	  if [ -n "$$p" ] && $$p -c '' >/dev/null 2>&1; then echo $$p; exit 0; fi; \
	done; echo python3.11)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test notebooks install benchmark benchmark-accuracy benchmark-streaming benchmark-detector benchmark-soak clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "needs Python >= 3.11 on PATH (or make PYTHON=/path/to/python3)"; exit 1; }
	@echo "setting up $(VENV) with $$($(PYTHON) --version 2>&1) ($(PYTHON))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	CRYSTALMAPPING_CATALOG=$${CRYSTALMAPPING_CATALOG:-$(CURDIR)/demo-output/catalog} \
	  $(VENV)/bin/crystalmapping demo --out-dir demo-output

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15

# Execute the notebooks in place on a Jupyter kernel of the venv, so they are read with outputs.
notebooks: $(STAMP)
	$(PY) notebooks/execute.py --inplace

benchmark: $(STAMP)
	$(PY) benchmarks/pipeline.py

benchmark-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py --report docs/accuracy.md

benchmark-streaming: $(STAMP)
	$(PY) benchmarks/streaming.py --rate 5

benchmark-detector: $(STAMP)
	$(PY) benchmarks/detector.py --report docs/performance.md

benchmark-soak: $(STAMP)
	$(PY) benchmarks/soak.py --runs 50 --report docs/soak.md

clean:
	rm -rf $(VENV) demo-output *.egg-info
