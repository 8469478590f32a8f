import logging
import os

# Keep every Ray listener on 127.0.0.1; Ray reads this when it is imported, so it is set before any test module
# imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Every test starts its own loopback-only Ray instance. One auth mode for the whole session: Ray 2.60 reads it once
# per process, so a test that changed it would break the clusters that later tests start.
os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    logging.getLogger("transformers").setLevel(logging.ERROR)
