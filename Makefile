# dicom-node: `make run` starts the node on config/node.toml, `make test` runs the suite.
# Both set up everything on a fresh machine first (Debian packages when missing, .venv).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= config/node.toml
APT_PKGS := dcmtk orthanc orthanc-dicomweb dicom3tools chromium chromium-driver rsyslog rsyslog-gnutls
# The OHIF viewer the node serves in front of its embedded Orthanc: the prebuilt dist/ of the
# pinned npm package, unpacked into an ignored folder (npm checks the tarball's integrity).
OHIF_VERSION := 3.13.2
OHIF_DIR := .ohif/app-$(OHIF_VERSION)
STAMP   := $(VENV)/.installed

.PHONY: install run test bench lint format demo-bundle clean

install: $(STAMP) $(OHIF_DIR)/index.html

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, at the version pyproject.toml pins, so that nothing pulls a multi-GB CUDA build
	$(BIN)/pip install -q "$$($(PY) tools/torch_pin.py)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

$(OHIF_DIR)/index.html:
	rm -rf $(OHIF_DIR).tmp && mkdir -p $(OHIF_DIR).tmp
	cd $(OHIF_DIR).tmp && npm pack --silent "@ohif/app@$(OHIF_VERSION)" >/dev/null
	tar -xzf $(OHIF_DIR).tmp/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIR).tmp
	rm -rf $(OHIF_DIR) && mv $(OHIF_DIR).tmp/package/dist $(OHIF_DIR) && rm -rf $(OHIF_DIR).tmp

run: install
	$(BIN)/dicom-node serve --config $(CONFIG)

# Four workers on two cores: most tests wait on a peer (a node, Orthanc, Triton, DCMTK). Each
# module runs whole in one worker (tests/conftest.py groups them), its fixtures set up once.
test: install
	$(BIN)/pytest -q -ra -n 4

bench: install
	$(BIN)/python -m bench

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

demo-bundle: install
	$(BIN)/python -m tools.train_demo_bundle

clean:
	rm -rf $(VENV) var .pytest_cache .ohif
