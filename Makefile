# Every target creates .venv itself, so a fresh machine needs only python3 (3.11+) and make.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the simulator's compiled hot path (setup.py): rebuilt whenever its sources change, so a
# stale build never runs in place of edited code
BUILT := $(VENV)/.compiled
SIM_SRC := setup.py $(foreach m,engine replica router,sim/$(m).py sim/$(m).pxd)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(BUILT)

# a fresh install has just built the extensions (and touched the stamp): build only when a
# source is newer than the stamp, so it is never built twice
$(BUILT): $(SIM_SRC) | $(STAMP)
	@if [ ! -f $(BUILT) ] || [ -n "$$(find $(SIM_SRC) -newer $(BUILT))" ]; then \
		echo "building the simulator's compiled hot path"; \
		$(PY) -m pip install --quiet --no-deps -e . ; \
	fi
	touch $(BUILT)

demo: $(BUILT)
	$(VENV)/bin/rollout sweep scenarios/azure-conv.yaml --out reports/azure-conv

test: $(BUILT)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(BUILT)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build sim/*.c sim/*.so
