"""The launch tests start multi-rank jobs, which never tokenize: prepare the fixture first.
The Slurm tests share one single-node cluster."""

import os

import pytest

from tests.launch.slurm_cluster import PACKAGES, SlurmCluster, missing_tools
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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real slurmctld + slurmd (CI installs them; skipped elsewhere without them or root)."""
    missing = missing_tools()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing): apt-get install {PACKAGES}")
    assert not missing, f"CI must have Slurm: apt-get install {PACKAGES} (missing {missing})"
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld / slurmd needs root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
