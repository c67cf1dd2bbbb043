"""A local cluster as a context manager, for the benchmarks (the same launcher as `dopd up`)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from services.launcher import Cluster, ClusterSpec, free_port


@contextlib.contextmanager
def running_cluster(model: str, prefill: int = 1, decode: int = 1, time_scale: float = 1.0, kv_blocks: int = 2048,
                    log_dir: Path | None = None, gateways: int = 1, **env: str):
    """Yield a started, ready Cluster; stop it (graceful drain) on the way out."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="dopd-bench-"))
    spec = ClusterSpec(model=model, prefill=prefill, decode=decode, port=free_port(), log_dir=log_dir,
                       kv_blocks=kv_blocks, time_scale=time_scale, gateways=gateways, extra_env=dict(env))
    cluster = Cluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(900)
        yield cluster
    finally:
        cluster.stop()
