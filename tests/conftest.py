"""Fixtures shared by the test modules (the shared functions are in ``helpers.py``)."""

import pytest

from data import write_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Synthetic classification shards small enough for multi-process runs: 256 train, 48 val, 32 per shard."""
    out = tmp_path_factory.mktemp("tiny") / "shards"
    assert (
        write_shards.main(["synthetic", str(out), "--train", "256", "--val", "48", "--shard-size", "32", "--no-progress"])
        == 0
    )
    return out
