"""services/kvtransfer/transports: the registry by name, what the setting makes of it, and the
per-peer book both the prefill hand-off and migration read (what a peer advertises, what it
refused)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.errors import InvalidArgument
from common.pb import worker_pb2
from services.kvtransfer import transports
from services.kvtransfer.transports import LocalKV, PeerBook, SharedReads, base, preference


def names(ts) -> list[str]:
    return [t.name for t in ts]


def test_preference_by_setting():
    assert names(preference("auto")) == ["nixl", "shm", "grpc"]
    assert names(preference("shm")) == ["shm", "grpc"] and names(preference("grpc")) == ["grpc"]
    assert transports.settings() == ("auto", "nixl", "shm", "grpc")
    with pytest.raises(ValueError, match="DOPD_KV_TRANSPORT"):
        preference("rdma")


def test_what_a_worker_offers_and_reads_follows_what_it_has():
    nothing, shm_pool, nixl_agent = LocalKV(), LocalKV(shared_pool=object()), LocalKV(nixl=object())
    assert names(t for t in transports.best_first() if t.offered(nothing)) == ["grpc"]
    assert names(t for t in transports.best_first() if t.offered(shm_pool)) == ["shm", "grpc"]
    assert names(t for t in transports.best_first() if t.offered(nixl_agent)) == ["nixl", "grpc"]
    maps = SharedReads(pools=object(), executor=None)
    assert names(t for t in transports.best_first() if t.reads_pool and t.reads_here(maps)) == ["shm"]
    assert not any(t.reads_pool and t.reads_here(None) for t in transports.best_first())


def test_a_begin_names_its_transport_by_the_pool_it_names():
    nixl = worker_pb2.KVPush.SharedSource(nixl=worker_pb2.NixlPool(agent_name="a"), block_table=[1])
    shm = worker_pb2.KVPush.SharedSource(pool=worker_pb2.SharedPool(pool_id="p"), block_table=[1])
    assert transports.for_source(nixl).name == "nixl" and transports.for_source(shm).name == "shm"
    with pytest.raises(InvalidArgument, match="names no pool"):
        transports.for_source(worker_pb2.KVPush.SharedSource(block_table=[1]))


def test_a_refused_transport_is_not_tried_again_with_that_peer():
    book = PeerBook()
    both = LocalKV(shared_pool=object(), nixl=object())
    assert names(book.to_try("a:1", "auto", both)) == ["nixl", "shm", "grpc"]
    assert book.refused("a:1", "nixl") is True and book.refused("a:1", "nixl") is False  # logged once
    assert names(book.to_try("a:1", "auto", both)) == ["shm", "grpc"]
    assert names(book.to_try("b:2", "auto", both)) == ["nixl", "shm", "grpc"]  # other peers unaffected
    assert names(book.to_try("b:2", "auto", LocalKV())) == ["grpc"]


def test_a_peer_reads_what_it_advertised_until_it_refuses():
    book = PeerBook()
    assert not book.reads("a:1", "nixl")
    book.learn("a:1", ["nixl", "shm"])
    assert book.reads("a:1", "nixl") and book.reads("a:1", "shm")
    book.refused("a:1", "nixl")
    assert not book.reads("a:1", "nixl") and book.reads("a:1", "shm")


def test_a_registered_transport_is_tried_in_its_rank_with_no_other_change():
    """What a fourth transport takes: a registered subclass; the setting, the peer book and
    `auto`'s order then know it."""

    @base.register
    class Rdma(base.Transport):
        name, rank, reads_pool, source_field = "rdma", 5, True, ""

        def offered(self, local):
            return getattr(local.store, "rdma", False)

    try:
        assert names(preference("auto")) == ["rdma", "nixl", "shm", "grpc"]
        assert names(preference("rdma")) == ["rdma", "grpc"]
        assert names(PeerBook().to_try("a:1", "auto", LocalKV(store=SimpleNamespace(rdma=True)))) == ["rdma", "grpc"]
    finally:
        del base._REGISTRY["rdma"]
