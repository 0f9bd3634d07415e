"""Session state left by one borrower never reaches the next one.

Every test uses a pool of exactly one connection, so borrower B gets the very server
connection borrower A used (same ``pg_backend_pid()``). For each case, A leaves some
session state behind; B must see the defaults. Along the way: a plain SELECT is
released without a reset (the zero-round-trip clean release), and a dirty release is
reset and the connection reused, not closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import asyncpg
import psycopg
import pytest

import millpond
from millpond.embedded import PostgresCluster
from tests.helpers import run

ROLE = "millpond_state_role"
SNEAKY = "millpond_sneaky"  # a function setting a GUC: invisible in the SQL text

# An action is SQL (simple protocol), (SQL, args) (extended protocol), or a callable.
Action = str | tuple[str, tuple[Any, ...]] | Callable[[Any], Awaitable[Any]]
# A check is SQL run by the borrower, or a callable (conn, dsn) -> value.
Check = str | Callable[[Any, str], Awaitable[Any]]


@pytest.fixture(scope="module", autouse=True)
def _objects(pg_cluster: PostgresCluster) -> None:
    pg_cluster.psql(
        f"""
        DO $$ BEGIN CREATE ROLE {ROLE};
        EXCEPTION WHEN duplicate_object THEN NULL; END $$;
        CREATE OR REPLACE FUNCTION {SNEAKY}() RETURNS void LANGUAGE plpgsql
        AS $$ BEGIN PERFORM set_config('myapp.sneaky', 'leaked', false); END $$;
        """
    )


# -- talking to either driver --------------------------------------------------------


async def value(conn: Any, sql: str, *args: Any) -> Any:
    if isinstance(conn, asyncpg.Connection):
        return await conn.fetchval(sql, *args)
    cur = await conn.execute(sql, args or None)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def act(conn: Any, action: Action) -> None:
    if callable(action):
        await action(conn)
        return
    sql, args = (action, ()) if isinstance(action, str) else action
    if isinstance(conn, asyncpg.Connection):
        await (conn.fetch(sql, *args) if args else conn.execute(sql))
    else:
        await conn.execute(sql, args or None)


async def observe(conn: Any, check: Check, dsn: str) -> Any:
    """What ``check`` sees on ``conn``; an error counts as an observation too."""
    try:
        return await (value(conn, check) if isinstance(check, str) else check(conn, dsn))
    except (asyncpg.PostgresError, psycopg.Error) as exc:
        return exc


async def backend_pid(pool: millpond.Pool) -> int:
    async with pool.acquire() as conn:
        pid: int = await value(conn, "SELECT pg_backend_pid()")
        return pid


# -- actions and checks that are not a single SQL string ------------------------------


async def asyncpg_open_transaction(conn: Any) -> None:
    tr = conn.transaction()
    await tr.start()
    await conn.fetchval("SELECT txid_current()")


async def psycopg_open_transaction(conn: Any) -> None:
    await conn.set_autocommit(False)
    await conn.execute("SELECT txid_current()")


async def failed_transaction(conn: Any) -> None:
    await conn.execute("BEGIN")
    with pytest.raises((asyncpg.DivisionByZeroError, psycopg.errors.DivisionByZero)):
        await conn.execute("SELECT 1/0")


async def asyncpg_add_listener(conn: Any) -> None:
    await conn.add_listener("mp_chan", lambda *args: None)


def psycopg_setting(name: str, arg: Any) -> Action:
    async def change(conn: Any) -> None:
        await getattr(conn, f"set_{name}")(arg)

    return change


async def client_settings(conn: Any, dsn: str) -> Any:
    return (conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable)


async def advisory_locks_held(conn: Any, dsn: str) -> Any:
    """Advisory locks held by ``conn``'s backend, seen from another connection."""
    pid = await value(conn, "SELECT pg_backend_pid()")
    other = await asyncpg.connect(dsn)
    try:
        sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1"
        return await other.fetchval(sql, pid)
    finally:
        await other.close()


# -- the cases -------------------------------------------------------------------------


class Case(NamedTuple):
    name: str
    asyncpg: Action | None  # None: not applicable to this driver
    psycopg: Action | None
    check: Check
    clean: Any


def same(name: str, action: Action, check: Check, clean: Any) -> Case:
    return Case(name, action, action, check, clean)


SEARCH_PATH = ("SHOW search_path", '"$user", public')
TENANT = ("SELECT coalesce(current_setting('myapp.tenant', true), '')", "")
NO_XID = ("SELECT txid_current_if_assigned() IS NULL", True)
DEFAULTS = (client_settings, (True, None, None, None))

CASES = [
    same("set-search-path", "SET search_path = pg_catalog", *SEARCH_PATH),
    same("set-statement-timeout", "SET statement_timeout = '1234s'", "SHOW statement_timeout", "0"),
    same("set-custom-guc", "SET myapp.tenant = 'acme'", *TENANT),
    Case(
        "set-config-select",
        ("SELECT set_config('myapp.tenant', $1, false)", ("acme",)),
        ("SELECT set_config('myapp.tenant', %s, false)", ("acme",)),
        *TENANT,
    ),
    same("set-role", f"SET ROLE {ROLE}", "SELECT current_user::text", "postgres"),
    same(
        "set-session-authorization",
        f"SET SESSION AUTHORIZATION {ROLE}",
        "SELECT session_user || '/' || current_user",
        "postgres/postgres",
    ),
    same(
        "create-temp-table",
        "CREATE TEMP TABLE mp_tmp (x int)",
        "SELECT to_regclass('pg_temp.mp_tmp')::text",
        None,
    ),
    same(
        "create-table-in-pg-temp",
        "CREATE TABLE pg_temp.mp_qualified (x int)",
        "SELECT to_regclass('pg_temp.mp_qualified')::text",
        None,
    ),
    same(
        "select-into-temp",
        "SELECT 1 AS x INTO TEMP mp_into",
        "SELECT to_regclass('pg_temp.mp_into')::text",
        None,
    ),
    same("listen", "LISTEN mp_chan", "SELECT count(*) FROM pg_listening_channels()", 0),
    Case(
        "add-listener",
        asyncpg_add_listener,
        None,
        "SELECT count(*) FROM pg_listening_channels()",
        0,
    ),
    same("advisory-lock", "SELECT pg_advisory_lock(4242)", advisory_locks_held, 0),
    Case(
        "try-advisory-lock",
        ("SELECT pg_try_advisory_lock($1)", (4243,)),
        ("SELECT pg_try_advisory_lock(%s)", (4243,)),
        advisory_locks_held,
        0,
    ),
    same(
        "sql-prepare",
        "PREPARE mp_stmt AS SELECT 1",
        "SELECT count(*) FROM pg_prepared_statements WHERE from_sql",
        0,
    ),
    same(
        "cursor-with-hold",
        "DECLARE mp_cur CURSOR WITH HOLD FOR SELECT 1",
        "SELECT count(*) FROM pg_cursors WHERE name <> ''",  # not the unnamed portal
        0,
    ),
    Case("open-transaction", asyncpg_open_transaction, psycopg_open_transaction, *NO_XID),
    same("open-transaction-begin", "BEGIN; SELECT txid_current()", *NO_XID),
    same("failed-transaction", failed_transaction, *NO_XID),
    Case("psycopg-read-only", None, psycopg_setting("read_only", True), *DEFAULTS),
    Case(
        "psycopg-isolation-level",
        None,
        psycopg_setting("isolation_level", psycopg.IsolationLevel.SERIALIZABLE),
        *DEFAULTS,
    ),
    Case("psycopg-autocommit-off", None, psycopg_setting("autocommit", False), *DEFAULTS),
    Case("psycopg-deferrable", None, psycopg_setting("deferrable", True), *DEFAULTS),
    same("multi-statement-ending-in-set", "SELECT 1; SET search_path = pg_catalog", *SEARCH_PATH),
    same("set-after-block-comment", "/* hi */ SET search_path = pg_catalog", *SEARCH_PATH),
    same("set-after-line-comment", "-- hi\nSET search_path = pg_catalog", *SEARCH_PATH),
    same(
        "set-after-nested-comment", "/* a /* b */ c */ SET search_path = pg_catalog", *SEARCH_PATH
    ),
    same(
        "update-pg-settings",
        "UPDATE pg_settings SET setting = 'pg_catalog' WHERE name = 'search_path'",
        *SEARCH_PATH,
    ),
    same(
        "do-block",
        "DO $$ BEGIN EXECUTE 'SET search_path = pg_catalog'; END $$",
        *SEARCH_PATH,
    ),
]

PARAMS = [
    pytest.param(driver, action, case, id=f"{driver}-{case.name}")
    for case in CASES
    for driver, action in (("asyncpg", case.asyncpg), ("psycopg", case.psycopg))
    if action is not None
]


def make_pool(dsn: str, driver: str, **kwargs: Any) -> millpond.Pool:
    return millpond.create_pool(dsn, driver=driver, min_size=1, max_size=1, **kwargs)


async def prove_no_leak(dsn: str, driver: str, action: Action, check: Check, clean: Any) -> None:
    async with make_pool(dsn, driver) as pool:
        pid = await backend_pid(pool)
        resets = pool.stats().resets
        assert await backend_pid(pool) == pid
        assert pool.stats().resets == resets, "a plain SELECT must not cause a reset"

        async with pool.acquire() as conn:  # borrower A
            assert await value(conn, "SELECT pg_backend_pid()") == pid
            await act(conn, action)
            assert await observe(conn, check, dsn) != clean, "A's action changed nothing"
        assert pool.stats().resets == resets + 1, "a dirty release must be reset"

        async with pool.acquire() as conn:  # borrower B
            assert await value(conn, "SELECT pg_backend_pid()") == pid
            assert await observe(conn, check, dsn) == clean
        assert pool.stats().connections_closed_total == 0


@pytest.mark.parametrize(("driver", "action", "case"), PARAMS)
def test_state_does_not_leak(pg_dsn: str, driver: str, action: Action, case: Case) -> None:
    run(prove_no_leak(pg_dsn, driver, action, case.check, case.clean))


DRIVERS = pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])


async def set_application_name(conn: Any) -> None:
    await conn.execute("SET application_name = 'millpond-test'")


@DRIVERS
def test_on_connect_settings_survive_reset(pg_dsn: str, driver: str) -> None:
    async def scenario() -> None:
        async with make_pool(pg_dsn, driver, on_connect=set_application_name) as pool:
            pid = await backend_pid(pool)
            async with pool.acquire() as conn:
                await act(conn, "SET application_name = 'x'")
            resets = pool.stats().resets
            assert resets >= 1
            async with pool.acquire() as conn:
                assert await value(conn, "SELECT pg_backend_pid()") == pid
                assert await value(conn, "SHOW application_name") == "millpond-test"
            assert pool.stats().connections_closed_total == 0

    run(scenario())


@DRIVERS
def test_on_connect_settings_keep_clean_release_free(pg_dsn: str, driver: str) -> None:
    """The SET run by on_connect is the baseline, not state left by a borrower."""

    async def scenario() -> None:
        async with make_pool(pg_dsn, driver, on_connect=set_application_name) as pool:
            for _ in range(3):
                await backend_pid(pool)
            assert pool.stats().resets == 0

    run(scenario())


@DRIVERS
def test_driver_statement_caches_survive_a_reset(pg_dsn: str, driver: str) -> None:
    """DISCARD ALL drops server-side prepared statements the drivers cached."""
    sql = "SELECT $1::int + 1" if driver == "asyncpg" else "SELECT %s::int + 1"

    async def scenario() -> None:
        async with make_pool(pg_dsn, driver) as pool:
            for _ in range(2):  # psycopg prepares from the 5th execution on
                async with pool.acquire() as conn:
                    for i in range(6):
                        assert await value(conn, sql, i) == i + 1
                    await act(conn, "SET search_path = pg_catalog")
            assert pool.stats().resets == 2
            assert pool.stats().connections_closed_total == 0

    run(scenario())


# -- what millpond cannot see: state set inside a server-side function ----------------

SNEAKY_CHECK = "SELECT coalesce(current_setting('myapp.sneaky', true), '')"


@DRIVERS
def test_state_set_inside_a_function_is_a_known_blind_spot(pg_dsn: str, driver: str) -> None:
    async def scenario() -> None:
        async with make_pool(pg_dsn, driver) as pool:
            async with pool.acquire() as conn:
                await value(conn, f"SELECT {SNEAKY}()")
            assert pool.stats().resets == 0
            async with pool.acquire() as conn:
                assert await value(conn, SNEAKY_CHECK) == "leaked"

    run(scenario())


@DRIVERS
def test_mark_dirty_prevents_the_function_leak(pg_dsn: str, driver: str) -> None:
    async def scenario() -> None:
        async with make_pool(pg_dsn, driver) as pool:
            pid = await backend_pid(pool)
            async with pool.acquire() as conn:
                await value(conn, f"SELECT {SNEAKY}()")
                pool.mark_dirty(conn)
            assert pool.stats().resets == 1
            async with pool.acquire() as conn:
                assert await value(conn, "SELECT pg_backend_pid()") == pid
                assert await value(conn, SNEAKY_CHECK) == ""

    run(scenario())


@DRIVERS
def test_reset_always_prevents_the_function_leak(pg_dsn: str, driver: str) -> None:
    async def scenario() -> None:
        async with make_pool(pg_dsn, driver, reset="always") as pool:
            pid = await backend_pid(pool)
            assert pool.stats().resets == 1, "reset='always' resets even clean releases"
            async with pool.acquire() as conn:
                await value(conn, f"SELECT {SNEAKY}()")
            async with pool.acquire() as conn:
                assert await value(conn, "SELECT pg_backend_pid()") == pid
                assert await value(conn, SNEAKY_CHECK) == ""
            assert pool.stats().resets == 3

    run(scenario())
