"""Shared fixtures: a real Redis (the machine's, on a test database, or a private redis-server)
and real clusters started through the same launcher as `dopd up`."""

from __future__ import annotations

import os
import tempfile
import uuid

import pytest
import redis
from hypothesis import settings

from services.launcher import redis_answers, start_redis
from tests.helpers import ClusterHandle, start_cluster

TEST_REDIS_DB = 15  # tests never touch database 0

# Property and fuzz tests draw the same examples on every run (a red CI is then reproducible);
# HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# The cluster token files that the launcher leaves for the dopd commands go here, not in $HOME.
os.environ.setdefault("DOPD_STATE_DIR", tempfile.mkdtemp(prefix="dopd-test-state-"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
    if redis_answers(url):
        yield url
        return
    proc, private = start_redis("127.0.0.1", tmp_path_factory.mktemp("redis"))
    try:
        yield private.rsplit("/", 1)[0] + f"/{TEST_REDIS_DB}"
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture(scope="session")
def redis_prefix(redis_url) -> str:
    prefix = f"dopd-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*"):
        client.delete(key)


@pytest.fixture(scope="session")
def tiny_cluster(redis_url, redis_prefix, tmp_path_factory) -> ClusterHandle:
    handle = start_cluster("tiny-random", tmp_path_factory.mktemp("tiny-cluster"), redis_url, redis_prefix + "tiny:",
                           kv_blocks=1536, env={"DOPD_KV_TIMEOUT_S": "3"})
    yield handle
    codes = handle.cluster.stop()
    assert all(code == 0 for code in codes.values()), f"a service did not drain cleanly: {codes}"
