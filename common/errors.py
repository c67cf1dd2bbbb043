"""Domain errors: what went wrong, in words, with no transport attached.

Service code raises these; `common/rpc/errors.py` alone maps them to gRPC status codes (and an
HTTP front end would map them to its own). Each class names a kind of failure a caller can act on.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A failure of ours (a bug or a broken invariant); the caller can only report it."""


class InvalidArgument(ServiceError):
    """The caller's input is wrong; the message says how."""


class ResourceExhausted(ServiceError):
    """Not now: out of KV blocks, queues full, or refused by admission control."""


class Unavailable(ServiceError):
    """Nobody can serve it now (no worker of a role, a peer gone); retrying later may work."""


class Refused(Unavailable):
    """A worker turned a call away before doing any work (draining, loading, another role, in a
    role switch): the caller may safely try another worker at once."""


class FailedPrecondition(ServiceError):
    """The system is not in a state that allows this (e.g. switching the last worker of a role)."""


class Aborted(ServiceError):
    """The request ended while this step of it was under way (cancelled, moved elsewhere)."""


class DeadlineExceeded(ServiceError):
    """It did not happen in time."""


class PeerError(ServiceError):
    """A peer answered with an error that means nothing more specific to our caller."""


# The exit status of a service that refused its model at load (sysexits' EX_CONFIG): a restart
# cannot help, so supervisors (`dopd up`) report it instead of restarting.
EXIT_MODEL_REFUSED = 78


class ModelRefused(Exception):
    """A model the serving paths cannot run exactly, refused when it loads: `feature` names what
    they lack. The message is the one line a user sees."""

    def __init__(self, model: str, model_type: str, feature: str) -> None:
        super().__init__(f"model {model!r} (model_type {model_type}) is refused: {feature}")
        self.model, self.model_type, self.feature = model, model_type, feature
