"""KV transfer, in one place: the sending side of a PushKV stream (prefill hand-off and live
migration alike), the receiving side (into a decode worker's reserved blocks), and reading a
running request's KV back out of the pool. Every byte uses the one wire format (common/kv/wire.py).
"""
