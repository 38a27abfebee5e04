# Two commands on a fresh clone: `make demo` (the main job on the built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= stores/demo.zarr
DEMO_RUNS ?= 2
DEMO_LAYERS ?= all,visual

.PHONY: setup demo test bench zoo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

# synth (once) -> materialize -> every representation -> train (DEMO_RUNS runs x 14 reps x DEMO_LAYERS) -> report
demo: setup
	$(BIN)/pipeline materialize --store $(STORE)
	$(BIN)/pipeline features --store $(STORE) --rep all
	$(BIN)/pipeline train --store $(STORE) --rep all --layers $(DEMO_LAYERS) --runs $(DEMO_RUNS) --quiet
	$(BIN)/pipeline report --store $(STORE)

# the trained zoo (500 adapters fine-tuned here, built once: ~30 min on 2 cores) and the full ablation on it (docs/zoo.md)
ZOO_STORE ?= stores/zoo.zarr
zoo: setup
	$(BIN)/pipeline materialize --source zoo:digits --store $(ZOO_STORE)
	$(BIN)/pipeline features --store $(ZOO_STORE) --rep all,dw_quantiles
	$(BIN)/pipeline train --store $(ZOO_STORE) --rep all --layers all,visual,text --runs 10 --quiet
	$(BIN)/pipeline report --store $(ZOO_STORE)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/materialize.py

clean:
	rm -rf $(STORE) stores/builtin
