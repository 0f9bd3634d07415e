"""Errors of a pool group (to be merged into :mod:`millpond.errors`).

Both are :class:`~millpond.errors.DatabaseUnavailable`: nothing was sent to any
server, so retry policies treat them as safe to retry.
"""

from __future__ import annotations

from millpond.errors import DatabaseUnavailable


class NoPrimaryAvailable(DatabaseUnavailable):
    """No member of the group is known to be a writable primary right now."""


class NoReplicaAvailable(DatabaseUnavailable):
    """No replica is in rotation and the group was told not to read from the primary."""
