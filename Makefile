PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

demo: $(VENV)/.installed
	$(PY) demo.py

bench: $(VENV)/.installed
	$(PY) bench.py

clean:
	rm -rf $(VENV) out data
