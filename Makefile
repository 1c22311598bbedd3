# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nla-installed
ARGS   ?=

.PHONY: demo demo-long test test-all setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml launch/setup_venv.sh
	bash launch/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nla demo --config configs/embedded.yaml $(ARGS)

demo-long: $(STAMP)
	$(VENV)/bin/nla demo --config configs/embedded-long.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(ARGS)

clean-venv:
	rm -rf $(VENV)
