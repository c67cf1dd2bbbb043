"""KV transfer, in one place: the wire format (wire.py), the transports by name and the per-peer
book of what each peer reads (transports/), the NIXL agent that registers the pool and reads
peers' (nixl_agent.py), peers' shared-memory pools mapped (peer_pools.py), the sending side of a
PushKV stream (prefill hand-off and live migration alike: sender.py, staged_sender.py), the
receiving side (into a sink's reserved blocks: receiver.py), and reading a running request's KV
back out of the pool (reader.py).

Below it, in common/kv, the pool itself and the memory it lives in, which the runners need: its
layout, its blocks, the memfd it is allocated in on a CPU (shared_memory.py), the copies to and
from a GPU pool (device_copy.py).
"""
