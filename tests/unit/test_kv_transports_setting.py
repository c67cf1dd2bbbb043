"""common/kv/transports.py: the setting's preference and the per-peer book both the prefill
hand-off and migration read (what a peer advertises, what it refused)."""

from __future__ import annotations

import pytest

from common.kv.transports import PeerBook, preference


def test_preference_by_setting():
    assert preference("auto") == ["nixl", "shm", "grpc"]
    assert preference("shm") == ["shm", "grpc"] and preference("grpc") == ["grpc"]
    with pytest.raises(ValueError, match="DOPD_KV_TRANSPORT"):
        preference("rdma")


def test_a_refused_transport_is_not_tried_again_with_that_peer():
    book = PeerBook()
    offered = {"nixl": True, "shm": True}
    assert book.to_try("a:1", "auto", offered) == ["nixl", "shm", "grpc"]
    assert book.refused("a:1", "nixl") is True and book.refused("a:1", "nixl") is False  # logged once
    assert book.to_try("a:1", "auto", offered) == ["shm", "grpc"]
    assert book.to_try("b:2", "auto", offered) == ["nixl", "shm", "grpc"]  # other peers unaffected
    assert book.to_try("b:2", "auto", {"nixl": False, "shm": False}) == ["grpc"]


def test_a_peer_reads_what_it_advertised_until_it_refuses():
    book = PeerBook()
    assert not book.reads("a:1", "nixl")
    book.learn("a:1", ["nixl", "shm"])
    assert book.reads("a:1", "nixl") and book.reads("a:1", "shm")
    book.refused("a:1", "nixl")
    assert not book.reads("a:1", "nixl") and book.reads("a:1", "shm")
