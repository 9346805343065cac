# Two commands do all the set-up on a fresh machine:
#   make demo   train the quick CPU preset on CIFAR-10 (then export and serve it)
#   make test   run the test suite
# and `make docs` serves the documentation locally.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10
RUN ?= runs/cpu
# The CPU build of torch lies on this project's machines; on others pip fetches 2.13.0 (CUDA
# on Linux): pass TORCH="torch --index-url https://download.pytorch.org/whl/cpu" there.
TORCH ?= torch==2.13.0

.PHONY: setup test lint demo docs docs-build clean

# The editable install: setuptools' "folders with the same name as your package" warning is
# silenced, as ./center_embed is the package itself.
$(BIN)/center-embed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)  # unquoted: TORCH may carry --index-url
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/center-embed

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/pytest -q

# The documentation site (docs/, mkdocs.yml) at http://127.0.0.1:8000, live-reloaded.
docs: setup
	$(BIN)/python docs/render_results.py
	$(BIN)/mkdocs serve

# What CI runs: the results tables as rendered, and a strict build into a temporary folder.
docs-build: setup
	$(BIN)/python docs/render_results.py --check
	site=$$(mktemp -d) && $(BIN)/mkdocs build --strict --quiet -d $$site && rm -rf $$site

HOST ?= 127.0.0.1
PORT ?= 8000

# Train (or finish an interrupted run), export, then serve until Ctrl-C.
demo: setup
	@if [ ! -f $(RUN)/eval.json ]; then \
	  $(BIN)/center-embed train --preset cpu --data $(DATA) --out $(RUN) \
	    $$( [ -f $(RUN)/last.pt ] && echo --resume $(RUN) ); \
	fi
	@[ -f $(RUN)/model.onnx ] || $(BIN)/center-embed export $(RUN)/best.pt --out $(RUN)/model.onnx
	@echo
	@echo "serving $(RUN)/model.onnx at http://$(HOST):$(PORT)  (API docs: http://$(HOST):$(PORT)/docs)"
	@echo "try:  curl -F files=@$(DATA)/test/cat/0000.jpg http://$(HOST):$(PORT)/v1/classify"
	@echo
	$(BIN)/center-embed serve $(RUN)/model.onnx --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
