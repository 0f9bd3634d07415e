"""Spreading reads over the replicas in rotation, by weight.

Both balancers pick from whatever candidates they are given (the set changes as
replicas leave and rejoin rotation), in O(number of candidates), without I/O.

- :class:`RoundRobin` is smooth weighted round robin (as in nginx): with weights 2:1 the
  order is A, B, A, A, B, A, ... never A, A, B in bursts.
- :class:`LeastInUse` sends the read to the replica with the fewest of the group's
  requests under way per unit of weight; ties (all idle, say) go by weighted round
  robin, so weights count under light load too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from millpond.errors import ConfigError
from millpond.routing.members import MemberState


class Balancer(Protocol):
    name: str

    def pick(self, candidates: Sequence[MemberState]) -> MemberState:
        """One of ``candidates`` (never empty)."""
        ...


class RoundRobin:
    """Smooth weighted round robin."""

    name = "round_robin"

    def pick(self, candidates: Sequence[MemberState]) -> MemberState:
        if len(candidates) == 1:
            return candidates[0]
        total = 0.0
        best = candidates[0]
        for member in candidates:
            member.rr_current += member.weight
            total += member.weight
            if member.rr_current > best.rr_current:
                best = member
        best.rr_current -= total
        return best


class LeastInUse:
    """Fewest requests under way per unit of weight; ties go by weighted round robin."""

    name = "least_in_use"

    def __init__(self) -> None:
        self._ties = RoundRobin()

    def pick(self, candidates: Sequence[MemberState]) -> MemberState:
        if len(candidates) == 1:
            return candidates[0]
        least = min(m.in_flight / m.weight for m in candidates)
        ties = [m for m in candidates if m.in_flight / m.weight == least]
        return ties[0] if len(ties) == 1 else self._ties.pick(ties)


def make_balancer(name: str) -> Balancer:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_in_use":
        return LeastInUse()
    raise ConfigError("balance", f"must be 'round_robin' or 'least_in_use', not {name!r}")
