# make demo   -- set up and run the whole workflow on the embedded default (tiny models, CPU)
# make test   -- set up and run the test suite
PY ?= python3
VENV ?= .venv
ROOT ?= runs/demo
# Where torch comes from. Empty: the default index (on a GPU host: a CUDA build). For a CPU-only
# machine elsewhere: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test clean
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/python -m stages workflow --config tiny --root $(ROOT)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf runs mlruns mlflow.db
