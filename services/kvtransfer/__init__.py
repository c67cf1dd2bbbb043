"""KV transfer, in one place: the wire format (wire.py), the transports by name and the per-peer
book of what each peer reads (transports/), the sending side of a PushKV stream (prefill hand-off
and live migration alike: sender.py, staged_sender.py), the receiving side (into a sink's reserved
blocks: receiver.py), and reading a running request's KV back out of the pool (reader.py).

Below it, in common/kv, the pool itself and the memory it lives in: its layout, its blocks, a
shared-memory segment peers on the host may map, a NIXL agent that registers it, the device
copies. A transport here puts those to use.
"""
