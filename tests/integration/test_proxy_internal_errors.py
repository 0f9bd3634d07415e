"""A bug of the proxy's while serving one client costs that client only.

The client is told (SQLSTATE XX000, "internal error in the pooler") and disconnected,
the traceback goes to the log, and every other client carries on.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from millpond.embedded import PostgresCluster
from tests.helpers import run
from tests.integration.test_proxy_admin import client, running_proxy


def test_an_internal_error_is_reported_to_its_client_only(
    pg_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with running_proxy(pg_cluster) as proxy:
            bystander = await client(proxy)
            real = proxy.pool_for

            def broken(database: str, user: str) -> Any:
                if user == "victim":
                    raise RuntimeError("a bug")
                return real(database, user)

            proxy.pool_for = broken  # type: ignore[method-assign]
            url = f"postgresql://victim@127.0.0.1:{proxy.port}/postgres"
            with pytest.raises(asyncpg.InternalServerError, match="internal error in the pooler"):
                await asyncpg.connect(url)
            assert await bystander.fetchval("SELECT 40 + 2") == 42
            later = await client(proxy)
            assert await later.fetchval("SELECT 1") == 1
            for conn in (bystander, later):
                await conn.close()

    run(main())
    assert "internal error serving" in caplog.text
    assert "RuntimeError: a bug" in caplog.text
