"""Which work a worker takes, given its role and whether it is switching or draining. Pure.

    serving(role)  --begin_switch(to)-->  switching(role -> to)  --finish-->  serving(to)
                                                                 --abort--->  serving(role)

While switching, the worker takes no new work of either role: a prefill worker finishes the
prompts it accepted, a decode worker moves (or finishes) the requests it holds and still takes
the KV of reservations it already made. Refusals are safe for the caller to retry elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import FailedPrecondition
from common.types import Role


@dataclass
class RoleState:
    role: Role
    switching_to: Role | None = None
    draining: bool = False

    @property
    def switching(self) -> bool:
        return self.switching_to is not None

    def refusal(self, role: Role) -> str | None:
        """Why new work of `role` is refused now, or None when it is taken."""
        if self.draining:
            return "is draining"
        if self.switching_to is not None:
            return f"is switching from {self.role} to {self.switching_to}"
        if not self.role.covers(role):
            return f"serves {self.role}, not {role}"
        return None

    def begin_switch(self, to: Role) -> None:
        if self.draining:
            raise FailedPrecondition("the worker is draining")
        if self.switching_to is not None:
            raise FailedPrecondition(f"a switch from {self.role} to {self.switching_to} is already under way")
        if to == self.role:
            raise FailedPrecondition(f"the worker already serves {to}")
        self.switching_to = to

    def finish_switch(self) -> Role:
        if self.switching_to is None:
            raise FailedPrecondition("no switch under way")
        self.role, self.switching_to = self.switching_to, None
        return self.role

    def abort_switch(self) -> None:
        self.switching_to = None
