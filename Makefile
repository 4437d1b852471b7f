# Every target creates .venv (python -m venv) when it is missing and installs the project with its
# dev extra into it; the install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.echotune-installed
DEMO   := .cache/demo

.PHONY: demo data-demo test test-all bench bench-quick bench-record clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The search on its embedded default (no GPU, no EchoNet, no weights): synthetic EchoNet-format
# data, the tiny pretrained-on-synthetic encoder, a short schedule; leaves a Pareto front.
demo: $(STAMP)
	$(PY) -m search.run --space selective_ft

# The data path alone: synthetic videos -> shards -> inspection PNGs.
data-demo: $(STAMP)
	test -f $(DEMO)/echonet/FileList.csv || $(PY) -m trainables.data.synthetic --out $(DEMO)/echonet --videos 48 --seed 0
	$(PY) -m trainables.data.shard --echonet-root $(DEMO)/echonet --out $(DEMO)/shards
	$(PY) -m trainables.data.inspect $(DEMO)/shards --split val --png results/demo-data

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: $(STAMP)
	$(PY) bench/loader.py
	$(PY) bench/step.py
	$(PY) bench/cache.py
	$(PY) bench/search.py

bench-quick: $(STAMP)
	$(PY) bench/loader.py --quick
	$(PY) bench/step.py --quick
	$(PY) bench/cache.py --quick
	$(PY) bench/search.py --quick

# Re-record bench/data/curves.csv (real training of the benchmark grid on CPU, 10-20 minutes).
bench-record: $(STAMP)
	$(PY) bench/record_curves.py

clean:
	rm -rf $(DEMO) results/demo-data
