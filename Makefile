# Two entry points for a fresh clone (see README): `make demo` and `make test`.
# Both create the local virtual environment .venv on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: it must come from the CPU wheel, never a resolver's CUDA pick.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,ros]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/occdistill demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
