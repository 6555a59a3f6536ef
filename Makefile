# crystalmapping: `make demo` and `make test` each set up .venv on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install benchmark benchmark-accuracy benchmark-streaming clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "needs $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	CRYSTALMAPPING_CATALOG=$${CRYSTALMAPPING_CATALOG:-$(CURDIR)/demo-output/catalog} \
	  $(VENV)/bin/crystalmapping demo --out-dir demo-output

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10

benchmark: $(STAMP)
	$(PY) benchmarks/pipeline.py

benchmark-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py --report docs/accuracy.md

benchmark-streaming: $(STAMP)
	$(PY) benchmarks/streaming.py --rate 5

clean:
	rm -rf $(VENV) demo-output *.egg-info
