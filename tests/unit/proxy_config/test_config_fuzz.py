"""Whatever bytes a config file holds, loading gives a config or a ConfigError, nothing else."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from millpond.errors import ConfigError
from millpond.proxy.authfile import parse_auth_file, parse_hba
from millpond.proxy.config import (
    SETTING_NAMES,
    ProxyConfig,
    load_config,
    parse_connstr,
    parse_database,
)

NAMES = st.sampled_from([*sorted(SETTING_NAMES), "host", "port", "pool_mode", "*", "x"])
VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "yes", "session", "0x1F", "1.5", "5min", "'q''x'", '"', ""]),
    st.text(alphabet="abc 019.-='\"%;#[]*,:\\\t", max_size=20),
)
LINES = st.one_of(
    st.builds(lambda n, v: f"{n} = {v}", NAMES, VALUES),
    st.sampled_from(["[pgbouncer]", "[databases]", "[users]", "[peers]", "[nope", "%include"]),
    st.builds(lambda v: f"db = host={v} {v}", VALUES),
    st.builds(lambda v: f"%include {v}", VALUES),
    st.text(max_size=30),
)


def _load(text: str) -> ProxyConfig | None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):  # includes stay inside
        path = Path(tmp) / "pgbouncer.ini"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_config(path)
        except ConfigError:
            return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINES, max_size=12))
def test_random_lines_load_or_raise_config_error(lines: list[str]) -> None:
    config = _load("\n".join(lines))
    assert config is None or isinstance(config, ProxyConfig)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_load_or_raise_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pgbouncer.ini"
        path.write_bytes(b"[pgbouncer]\n" + data)
        with contextlib.suppress(ConfigError):
            load_config(path)


@given(st.text(max_size=60))
def test_connstr_and_entries(text: str) -> None:
    try:
        parse_connstr(text, "db")
        parse_database("db", text)
    except ConfigError:
        pass


@given(st.text(alphabet='"; \tabc$:=md5SCRAM-H2\n#', max_size=80))
def test_auth_file_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_auth_file(text)


@given(st.text(alphabet='"#, \tlocahstnmd5rj0123456789./:@+-=\n', max_size=80))
def test_hba_text(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_hba(text, "/nonexistent/hba.conf")
