# Two commands on a fresh clone: `make demo` (the main job on the built-in data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= stores/demo.zarr

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(BIN)/pipeline materialize --store $(STORE)
	$(BIN)/pipeline info --store $(STORE)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/materialize.py

clean:
	rm -rf $(STORE) stores/builtin
