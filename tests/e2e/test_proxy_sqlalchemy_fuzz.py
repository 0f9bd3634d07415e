"""SQLAlchemy through the proxy, and hostile bytes that must hurt nobody else."""

from __future__ import annotations

import asyncio
import struct

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from millpond.proxy.protocol import messages as m
from tests.e2e.conftest import ProxyProcess
from tests.helpers import run


def test_sqlalchemy_sync_and_async(tx_proxy: ProxyProcess) -> None:
    url = tx_proxy.url().replace("postgresql://", "postgresql+psycopg://")
    meta = MetaData()
    items = Table(
        "e2e_sa_items", meta, Column("id", Integer, primary_key=True), Column("name", String)
    )
    # psycopg's default prepare_threshold prepares repeated statements server-side.
    engine = create_engine(url, poolclass=NullPool)
    meta.drop_all(engine)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(items.insert(), [{"id": i, "name": f"n{i}"} for i in range(50)])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(items)).scalar() == 50
    engine.dispose()

    async def main() -> None:
        aurl = tx_proxy.url().replace("postgresql://", "postgresql+asyncpg://")
        # asyncpg with its statement cache on: named prepared statements throughout.
        aengine = create_async_engine(aurl, poolclass=NullPool)
        async with aengine.begin() as conn:
            total = await conn.scalar(select(func.sum(items.c.id)))
            assert total == sum(range(50))
        async with aengine.begin() as conn:
            await conn.execute(items.delete().where(items.c.id >= 25))
        async with aengine.connect() as conn:
            for _ in range(20):  # the same statements again, on whichever server
                assert await conn.scalar(select(func.count()).select_from(items)) == 25
        await aengine.dispose()

    run(main())
    meta.drop_all(create_engine(url, poolclass=NullPool))


def _startup() -> bytes:
    return m.startup_message({"user": "postgres", "database": "postgres"})


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.binary(min_size=1, max_size=200),
    after_login=st.booleans(),
    lie_about_length=st.booleans(),
)
def test_hostile_bytes_hurt_only_their_sender(
    tx_proxy: ProxyProcess, junk: bytes, after_login: bool, lie_about_length: bool
) -> None:
    async def hostile() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", tx_proxy.port)
        if after_login:
            writer.write(_startup())
            await asyncio.wait_for(reader.readuntil(b"Z\x00\x00\x00\x05I"), 5)
        payload = junk
        if lie_about_length:
            payload = b"Q" + struct.pack("!I", 0x7FFFFFF0) + junk
        writer.write(payload)
        try:
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), 0.3)
        except (ConnectionError, TimeoutError):
            pass
        writer.close()

    async def main() -> None:
        bystander = await asyncpg.connect(tx_proxy.url(), statement_cache_size=0)
        try:
            await asyncio.gather(hostile(), hostile())
            assert await bystander.fetchval("SELECT 6 * 7") == 42
        finally:
            await bystander.close()

    run(main(), timeout=30)
