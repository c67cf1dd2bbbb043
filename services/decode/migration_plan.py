"""The live-migration protocol's constants, pure, shared by the worker (services/decode/migration.py)
and the virtual-time simulator (services/simulate/switching.py), so that both move a request the
same way: PRECOPY_ROUNDS rounds of copying the KV written so far while the request decodes on,
then a pause between two steps, the tail, and the hand-over."""

PRECOPY_ROUNDS = 2
