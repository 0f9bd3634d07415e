"""The login's answer (ClientHandshake.welcome): parameters, cancel key, ReadyForQuery,
and the client's own view of its tracked parameters, cached or not."""

from __future__ import annotations

from typing import Any

from millpond.proxy import login
from millpond.proxy.backend import TRACKED_PARAMS
from millpond.proxy.protocol.codec import MessageReader
from millpond.proxy.protocol.parsers import decode_parameter_status

SERVER = {
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "TimeZone": "UTC",
    "server_version": "15.4",
    "application_name": "",
}


class Wire:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data


class Client:
    """What ClientHandshake.welcome touches of a ClientConnection."""

    def __init__(self, params: dict[str, str], pid: int, key: bytes) -> None:
        self.params = dict(params)
        self.param_sig: tuple[str | None, ...] = ()
        self.pid, self.key = pid, key
        self.transport = Wire()


def welcome(params: dict[str, str], pid: int = 7, key: bytes = b"abcd") -> tuple[Client, Any]:
    client = Client(params, pid, key)
    handshake = login.ClientHandshake(client)  # type: ignore[arg-type]
    handshake.greeting = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    handshake.welcome(dict(SERVER))
    reader = MessageReader()
    reader.feed(client.transport.sent)
    return client, list(reader)


def statuses(messages: list[Any]) -> dict[str, str]:
    found = [decode_parameter_status(msg.payload) for msg in messages if msg.type == b"S"]
    return {s.name: s.value for s in found}


def test_welcome_is_greeting_parameters_key_ready() -> None:
    _, messages = welcome({"application_name": "app"})
    assert [msg.type for msg in messages] == [b"R"] + [b"S"] * len(SERVER) + [b"K", b"Z"]
    assert statuses(messages) == SERVER | {"application_name": "app"}
    assert bytes(messages[-2].payload) == b"\x00\x00\x00\x07abcd"


def test_each_client_gets_its_own_parameters_and_key_from_the_cache() -> None:
    login._WELCOMES.clear()
    first, one = welcome({"application_name": "a", "TimeZone": "Europe/Paris"}, 1, b"1111")
    second, two = welcome({"application_name": "b"}, 2, b"2222")
    again, three = welcome({"application_name": "a", "TimeZone": "Europe/Paris"}, 3, b"3333")
    mine = SERVER | {"application_name": "a", "TimeZone": "Europe/Paris"}
    assert statuses(one) == statuses(three) == mine
    assert statuses(two) == SERVER | {"application_name": "b"}
    assert [bytes(msg.payload) for msg in (one[-2], two[-2], three[-2])] == [
        b"\x00\x00\x00\x011111",
        b"\x00\x00\x00\x022222",
        b"\x00\x00\x00\x033333",
    ]
    # the client's view: what it set, and the server's value for the tracked rest
    for client, own in ((first, "a"), (second, "b"), (again, "a")):
        expected = {name: SERVER.get(name) for name in TRACKED_PARAMS}
        expected["application_name"] = own
        if own == "a":
            expected["TimeZone"] = "Europe/Paris"
        assert client.param_sig == tuple(expected[name] for name in TRACKED_PARAMS)
        assert {n: client.params.get(n) for n in TRACKED_PARAMS} == expected
    assert len(login._WELCOMES) == 2


def test_the_cache_stays_bounded() -> None:
    login._WELCOMES.clear()
    for n in range(login._WELCOMES_KEPT * 2 + 3):
        welcome({"application_name": f"app {n}"})
    assert 0 < len(login._WELCOMES) <= login._WELCOMES_KEPT
