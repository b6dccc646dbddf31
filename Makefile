PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test gpu-check demo bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

# bf16/fp16 autocast, compile, fused AdamW, NCCL and bench.py on CUDA; they skip without a GPU
gpu-check: $(VENV)/.installed
	$(PY) -m pytest -q -p no:xdist -m gpu -rs tests/test_gpu.py

demo: $(VENV)/.installed
	$(PY) demo.py

bench: $(VENV)/.installed
	$(PY) bench.py

clean:
	rm -rf $(VENV) out data
