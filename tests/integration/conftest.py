"""Fixtures the gateway's integration modules share."""

from __future__ import annotations

import pytest

from tests.integration.fake_cluster import FakeCluster


@pytest.fixture(scope="module")
def fake_cluster():
    """Fake conductor/prefill/decode gRPC servers on a loopback port, one per test module."""
    fake = FakeCluster().start()
    yield fake
    fake.stop()
