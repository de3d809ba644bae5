# dicom-node: `make run` starts the node on config/node.toml, `make test` runs the suite.
# Both set up everything on a fresh machine first (Debian packages when missing, .venv).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= config/node.toml
APT_PKGS := dcmtk orthanc dicom3tools chromium
STAMP   := $(VENV)/.installed

.PHONY: install run test bench lint format demo-bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned on its own line first so that nothing pulls a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/dicom-node serve --config $(CONFIG)

test: install
	$(BIN)/pytest -q -ra

bench: install
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

demo-bundle: install
	$(BIN)/python tools/train_demo_bundle.py

clean:
	rm -rf $(VENV) var .pytest_cache
