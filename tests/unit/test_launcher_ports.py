"""The launcher hands every service of a cluster its own port (services/launcher.py)."""
from __future__ import annotations

import socket

from services.launcher import cluster_ports, free_port


def test_http_port_inside_the_worker_range_is_moved_out() -> None:
    # The CI failure this guards: the HTTP port, picked at random by the caller, was one of the
    # gRPC ports the launcher gave a worker, and the gateway could not bind it.
    gateway = free_port()
    grpc, metrics, http = cluster_ports("127.0.0.1", gateway, gateway + 2, n_workers=2)
    every = [gateway, *grpc, *metrics, http]
    assert len(set(every)) == len(every), every
    assert len(grpc) == 3 and len(metrics) == 4 and http > 0


def test_ports_skip_one_in_use_and_http_off() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        used = busy.getsockname()[1]
        grpc, metrics, http = cluster_ports("127.0.0.1", used - 1, 0, n_workers=1)
        assert used not in grpc and used not in metrics
        assert http == 0
