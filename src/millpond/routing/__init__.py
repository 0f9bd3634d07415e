"""Read/write splitting: a primary and its replicas behind one pool group.

``PoolGroup`` (or ``create_group``) routes reads to replicas and writes to the
primary, keeps lagging replicas out of rotation, follows a failover, and can make a
caller read its own writes. See ``docs/read-write-splitting.md``.
"""

from millpond.routing.classify import Classifier, Route, Verdict
from millpond.routing.config import GroupConfig, Member
from millpond.routing.errors import NoPrimaryAvailable, NoReplicaAvailable
from millpond.routing.functions import READ_ONLY_FUNCTIONS
from millpond.routing.group import PoolGroup, create_group
from millpond.routing.lease import GroupLease
from millpond.routing.members import GroupStats, MemberStats, Role

__all__ = [
    "READ_ONLY_FUNCTIONS",
    "Classifier",
    "GroupConfig",
    "GroupLease",
    "GroupStats",
    "Member",
    "MemberStats",
    "NoPrimaryAvailable",
    "NoReplicaAvailable",
    "PoolGroup",
    "Role",
    "Route",
    "Verdict",
    "create_group",
]
