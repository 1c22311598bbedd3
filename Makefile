# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nla-installed
ARGS   ?=

VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.nla-installed

.PHONY: demo demo-long demo-cross test test-all setup vllm clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml launch/setup_venv.sh
	bash launch/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nla demo --config configs/embedded.yaml $(ARGS)

demo-long: $(STAMP)
	$(VENV)/bin/nla demo --config configs/embedded-long.yaml $(ARGS)

demo-cross: $(STAMP)
	$(VENV)/bin/nla demo --config configs/embedded-cross.yaml $(ARGS)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): launch/setup_vllm.sh
	bash launch/setup_vllm.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

# The linter (ruff: lint + format, configured in pyproject.toml), the default suite, then the vLLM
# engine's tests (marker vllm) with the engine's environment required.
test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(ARGS)
	NLA_VLLM_PYTHON=$(VLLM_VENV)/bin/python NLA_REQUIRE_VLLM=1 $(PY) -m pytest -m vllm $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(ARGS)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
