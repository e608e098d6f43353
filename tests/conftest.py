"""Shared fixtures: the seeds and torch threads of every test, a small synthetic dataset (an official-format
tree) and the overrides that make a demo run tiny and fast."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import SeaweedS3, free_port  # noqa: F401 - free_port is part of the tests' toolbox

from dvgt.data.synthetic import generate_synthetic_dataset

OFFICIAL = Path(__file__).parent / "data" / "official"  # the tree written by the official code, and its outputs
OFFICIAL_TREE, OFFICIAL_OUTPUTS = OFFICIAL / "official_format", OFFICIAL / "official_outputs"
TORCH_THREADS = 1  # tiny models: one thread is fastest (two on a shared 2-core machine are often many times slower)


@pytest.fixture(scope="session", autouse=True)
def default_threads():
    """TORCH_THREADS also for the module and session fixtures (they run before a test's own fixtures)."""
    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def seeds_and_threads(request):
    """Each test starts from the same state whatever ran before it: torch, numpy and random seeded with 0, and
    torch's intra-op threads from the closest `torch_threads(n)` mark (the test's, else its module's
    `pytestmark`), else TORCH_THREADS; reset afterwards. Test modules set none of these at import time."""
    mark = request.node.get_closest_marker("torch_threads")
    torch.set_num_threads(mark.args[0] if mark else TORCH_THREADS)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A small synthetic official-format tree (dataset demo, splits train and val; 12 frames per scene,
    enough for DVGT-2's 8 future frames)."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(root, split="train", num_scenes=3, num_frames=12, height=64, width=128, seed=0)
    generate_synthetic_dataset(root, split="val", num_scenes=1, num_frames=12, height=64, width=128, seed=1)
    return root


def tiny_overrides(data_root: Path, run_dir: Path, **extra) -> list:
    """The demo stage shrunk to a tiny model, 64x32 images and a few steps, writing under run_dir."""
    values = {
        "model.size": "tiny",
        "max_epochs": 2,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "max_img_per_gpu": 8,
        "num_workers": 0,
        "seed_value": 3,
        "data.root": data_root,
        "data.train.img_width": 64,
        "data.val.img_width": 64,
        "data.train.views": "[2,2]",
        "data.val.fixed_num_frames": 2,
        "logging.log_dir": run_dir,
        "logging.log_freq": 1,
        "logging.progress": "false",
        "checkpoint.uri": run_dir / "ckpts",
        "checkpoint.keep_last": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server for the whole session (stopped at the end); see tests/servers.py."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    """The AWS variables pointing at the session's SeaweedFS, and a bucket 'ckpt' in it."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    seaweedfs.make_bucket("ckpt")
    return seaweedfs
