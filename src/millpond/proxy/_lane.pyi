import asyncio
from collections.abc import Callable
from typing import Any

END: str
REFUSED: str
EOF: str
ERROR: str
BLOCKED: str
ASKED: str

#: on_eject(client_owner, client_unread, client_owed, server_owner, server_unread,
#:          server_owed, reason)
EjectHook = Callable[[Any, bytes, bytes, Any, bytes, bytes, str], object]

class Side:
    @property
    def fd(self) -> int: ...
    @property
    def owner(self) -> Any: ...
    @property
    def server(self) -> bool: ...
    @property
    def active(self) -> bool: ...
    @property
    def bytes_forwarded(self) -> int: ...
    @property
    def messages_forwarded(self) -> int: ...

class Lane:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_eject: EjectHook,
        client_types: bytes,
        server_types: bytes,
        *,
        end_types: bytes = ...,
        query_ok: Callable[[bytes], bool] | None = ...,
        max_message: int = ...,
    ) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def wakeups(self) -> int: ...
    def __len__(self) -> int: ...
    def enter(
        self, client_owner: Any, client_fd: int, server_owner: Any, server_fd: int
    ) -> tuple[Side, Side]: ...
    def eject(self, side: Side, reason: str = ...) -> None: ...
    def close(self) -> None: ...
    def on_ready(self) -> None: ...
