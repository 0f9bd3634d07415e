"""The errors the proxy sends during login are PgBouncer's: FATAL, 08P01, same text."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from millpond.proxy import auth
from tests.unit.proxy_auth.exchange import error_of

PGBOUNCER_TEXTS: list[tuple[Callable[[], bytes], str]] = [
    (auth.error_password_failed, "password authentication failed"),
    (auth.error_sasl_failed, "SASL authentication failed"),
    (auth.error_trust_failed, '"trust" authentication failed'),
    (auth.error_login_rejected, "login rejected"),
    (auth.error_no_auth_method, "no authentication method is found"),
    (auth.error_empty_password, "empty password returned by client"),
    (auth.error_invalid_sasl_mechanism, "client selected an invalid SASL authentication mechanism"),
    (auth.error_no_such_user, "no such user"),
    (lambda: auth.error_no_such_database("nope"), "no such database: nope"),
    (lambda: auth.error_protocol_violation("bad packet"), "bad packet"),
]


@pytest.mark.parametrize(("build", "text"), PGBOUNCER_TEXTS)
def test_error_is_fatal_08p01_with_pgbouncers_text(build: Callable[[], bytes], text: str) -> None:
    error = error_of(build())
    assert (error.severity, error.code, error.message) == ("FATAL", "08P01", text)


def test_pooler_error_takes_another_sqlstate() -> None:
    error = error_of(auth.pooler_error("database does not exist", "3D000"))
    assert (error.code, error.message) == ("3D000", "database does not exist")


def test_md5_helpers_match_postgresqls_formula() -> None:
    inner = "md5" + hashlib.md5(b"s3cretbob").hexdigest()
    assert auth.md5_password_hash("s3cret", "bob") == inner
    outer = "md5" + hashlib.md5(inner[3:].encode() + b"\x01\x02\x03\x04").hexdigest()
    assert auth.md5_salted_response(inner, b"\x01\x02\x03\x04") == outer


@pytest.mark.parametrize(
    ("secret", "kind"),
    [
        ("hunter2", "plain"),
        ("md5" + "0" * 32, "md5"),
        ("md5" + "z" * 32, "plain"),  # looks like a hash but is not: PgBouncer says plain
        ("SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=", "scram-sha-256"),
        ("SCRAM-SHA-256$broken", "plain"),
    ],
)
def test_secret_kind_classifies_like_pgbouncer(secret: str, kind: str) -> None:
    assert auth.secret_kind(secret) == kind


def test_prepare_password_falls_back_to_raw_bytes_like_postgresql() -> None:
    assert auth.prepare_password("I\u00adX") == b"IX"  # soft hyphen maps to nothing
    assert auth.prepare_password("a\u0007b") == b"a\x07b"  # prohibited: used as is
