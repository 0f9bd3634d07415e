"""Settings are validated up front, and every error names the setting."""

from __future__ import annotations

from typing import Any

import pytest

import millpond
from millpond import ConfigError, PoolConfig


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"min_size": -1}, "min_size"),
        ({"max_size": 0}, "max_size"),
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"acquire_timeout": 0}, "acquire_timeout"),
        ({"acquire_timeout": None}, "acquire_timeout"),
        ({"acquire_timeout": "3"}, "acquire_timeout"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"max_idle": -5}, "max_idle"),
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"lifetime_jitter": 1.0}, "lifetime_jitter"),
        ({"max_uses": 1.5}, "max_uses"),
        ({"connect_timeout": None}, "connect_timeout"),
        ({"max_concurrent_connects": 0}, "max_concurrent_connects"),
        ({"validate_idle_after": float("nan")}, "validate_idle_after"),
        ({"leak_threshold": 0}, "leak_threshold"),
        ({"reset": "sometimes"}, "reset"),
        ({"min_size": True}, "min_size"),
    ],
)
def test_bad_setting_is_named(settings: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig(**settings)
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        millpond.Pool(driver="memory", max_sise=3)
    assert info.value.setting == "max_sise"
    assert "max_size" in str(info.value)  # the message lists what is known


def test_unknown_driver() -> None:
    with pytest.raises(ConfigError, match="driver"):
        millpond.Pool(driver="oracle")


def test_settings_are_frozen_and_keyword_only() -> None:
    cfg = PoolConfig(min_size=0, max_size=3)
    with pytest.raises(AttributeError):
        cfg.max_size = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        PoolConfig(1, 2)  # type: ignore[misc]


def test_defaults_are_bounded() -> None:
    cfg = PoolConfig()
    assert cfg.acquire_timeout == 30.0
    assert cfg.min_size <= cfg.max_size
