"""The launch tests start multi-rank jobs, which never tokenize: prepare the fixture first."""

import os

import pytest

from tests.training.conftest import ROOT, SMALL
from ultramem_megatron.config import load_config


@pytest.fixture(scope="session", autouse=True)
def prepared_fixture() -> None:
    """data/built/fixture (SMALL's blend) built once, as a run of one process would build it."""
    from ultramem_megatron.data.prepare import ensure_prepared
    from ultramem_megatron.data.tokenizer import load_tokenizer

    cwd = os.getcwd()
    os.chdir(ROOT)   # the blend's paths are relative to the repository root
    try:
        data = load_config("configs/tiny.yaml", SMALL).data
        ensure_prepared(data, load_tokenizer(data.tokenizer))
    finally:
        os.chdir(cwd)
