"""Turning a group's arguments into members: settings split, pools created.

Keyword arguments of :class:`~millpond.routing.PoolGroup` are either group settings
(:class:`GroupConfig`) or pool settings for every member; anything else is refused
with :class:`~millpond.errors.ConfigError` naming it. Pools the group creates get an
``on_connect`` hook that checks each new session's role before the user's own hook.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from millpond.config import PoolConfig
from millpond.drivers.base import Driver
from millpond.errors import ConfigError
from millpond.pool.pool import Pool
from millpond.routing.config import GroupConfig, Member
from millpond.routing.members import MemberState, Role

_HOOKS = frozenset({"on_connect", "on_acquire", "on_release", "on_close", "on_breaker_change"})
POOL_KEYS = PoolConfig.setting_names() | _HOOKS | {"connect_kwargs", "driver"}

#: ``verify(member, conn)``: the group's check of a new connection's role.
Verify = Callable[[MemberState, Any], Awaitable[None]]


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(group settings, pool settings); an unknown name raises ConfigError."""
    group = {k: v for k, v in settings.items() if k in GroupConfig.setting_names()}
    pool = {k: v for k, v in settings.items() if k not in group}
    unknown = sorted(set(pool) - POOL_KEYS)
    if unknown:
        known = sorted(GroupConfig.setting_names() | POOL_KEYS)
        raise ConfigError(unknown[0], f"unknown setting; known: {', '.join(known)}")
    return group, pool


def build_members(
    group: str,
    specs: Sequence[Member],
    driver: str | Driver,
    settings: dict[str, Any],
    verify: Verify,
) -> list[MemberState]:
    """One member per spec (the first is the declared primary), names made unique."""
    labels: list[str] = []
    for i, spec in enumerate(specs):
        label = spec.label(i)
        labels.append(f"{label}#{i}" if label in labels else label)
    members = [
        _member(group, i, label, spec, driver, settings, verify)
        for i, (label, spec) in enumerate(zip(labels, specs, strict=True))
    ]
    drivers = {m.pool.driver.name for m in members}
    if len(drivers) > 1:
        raise ConfigError("driver", f"all members must use one driver, got {sorted(drivers)}")
    return members


def _member(
    group: str,
    index: int,
    label: str,
    spec: Member,
    driver: str | Driver,
    settings: dict[str, Any],
    verify: Verify,
) -> MemberState:
    declared = Role.PRIMARY if index == 0 else Role.REPLICA
    if isinstance(spec.target, Pool):
        return MemberState(index, label, spec.target, declared, spec.weight)
    kwargs = {**settings, **spec.settings}
    unknown = sorted(set(kwargs) - POOL_KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown pool setting for member {label!r}")
    user_hook = kwargs.pop("on_connect", None)
    member_driver = kwargs.pop("driver", driver)
    box: list[MemberState] = []

    async def on_connect(conn: Any) -> None:
        await verify(box[0], conn)
        if user_hook is not None:
            await user_hook(conn)

    pool = Pool(
        spec.target, driver=member_driver, name=f"{group}:{label}", on_connect=on_connect, **kwargs
    )
    box.append(MemberState(index, label, pool, declared, spec.weight))
    return box[0]
