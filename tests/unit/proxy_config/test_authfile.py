"""userlist.txt secrets are classified and validated; HBA rules parse and match."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from millpond.errors import ConfigError
from millpond.proxy.authfile import (
    classify_secret,
    load_auth_file,
    load_hba_file,
    parse_auth_file,
    parse_hba,
    parse_scram_secret,
)
from tests.unit.proxy_config.conftest import WriteFile


def scram(iterations: int = 4096, key_len: int = 32) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    keys = f"{b64(b'k' * key_len)}:{b64(b's' * key_len)}"
    return f"SCRAM-SHA-256${iterations}:{b64(b'salt-0123456789')}${keys}"


MD5 = "md5" + "0123456789abcdef" * 2

# --------------------------------------------------------------------------- userlist.txt


def test_userlist_classifies_each_secret(write: WriteFile) -> None:
    text = f'''; users for pgbouncer
"plainuser" "hunter2"

"md5user" "{MD5.upper().replace("MD5", "md5")}"
   "scramuser"   "{scram()}"   trailing text is ignored
"we""ird" "pa""ss"
"empty" ""
'''
    auth = load_auth_file(write(text, "userlist.txt"))
    kinds = {name: entry.kind for name, entry in auth.entries.items()}
    assert kinds == {
        "plainuser": "plain",
        "md5user": "md5",
        "scramuser": "scram-sha-256",
        'we"ird': "plain",
        "empty": "plain",
    }
    assert auth.entries["md5user"].secret == MD5  # hex case normalised
    assert auth.entries['we"ird'].secret == 'pa"ss'
    assert auth.entries["scramuser"].source.endswith("userlist.txt:5")
    assert "plainuser" in auth
    assert len(auth) == 5
    assert auth.get("nobody") is None


def test_scram_parts() -> None:
    parts = parse_scram_secret(scram(iterations=10000))
    assert parts.iterations == 10000
    assert parts.salt == b"salt-0123456789"
    assert (parts.stored_key, parts.server_key) == (b"k" * 32, b"s" * 32)


@pytest.mark.parametrize(
    ("secret", "kind"),
    [
        ("hunter2", "plain"),
        ("md5isnotahash", "plain"),  # too short to be a hash: a password
        (MD5, "md5"),
        (scram(), "scram-sha-256"),
        ("", "plain"),
    ],
)
def test_classify_secret(secret: str, kind: str) -> None:
    assert classify_secret(secret) == kind


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ("md5" + "z" * 32, "malformed MD5 hash"),
        ("SCRAM-SHA-256$4096:salt", "malformed SCRAM secret"),
        (scram(iterations=0), "at least 1"),
        (scram(key_len=16), "32 bytes"),
        ("SCRAM-SHA-256$4096:c2FsdA==$!!!!:c2FsdA==", "not valid base64"),
    ],
)
def test_malformed_secrets(secret: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        classify_secret(secret)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("alice secret", "expected the user name in double quotes"),
        ('"alice"', "expected the secret in double quotes"),
        ('"alice" secret', "expected the secret in double quotes"),
        ('"alice secret', "unterminated quoted user name"),
        ('"alice" "secret', "unterminated quoted secret"),
        ('"" "secret"', "empty user name"),
        (f'"alice" "md5{"x" * 32}"', "user 'alice': malformed MD5 hash"),
        ('"alice" "SCRAM-SHA-256$nope"', "user 'alice': malformed SCRAM secret"),
    ],
)
def test_bad_userlist_line(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_auth_file(f'"ok" "fine"\n\n{line}\n', "users.txt")
    assert (caught.value.setting, caught.value.source) == ("auth_file", "users.txt:3")
    assert fragment in str(caught.value)


def test_later_line_wins_and_secret_stays_out_of_repr() -> None:
    auth = parse_auth_file('"a" "first"\n"a" "second"\n')
    assert auth.entries["a"].secret == "second"
    assert "second" not in repr(auth.entries["a"])


# --------------------------------------------------------------------------- HBA

HBA = """\
# TYPE     DATABASE        USER            ADDRESS                  METHOD
local      all             postgres                                 peer
local      sameuser        all                                      trust
hostssl    app,"Mixed Db"  app_user        10.1.0.0/16              scram-sha-256
host       app             all             10.1.2.0  255.255.255.0  md5
hostnossl  all             all             192.168.0.10/32          password
host       replication     replicator      10.9.0.0/16              scram-sha-256
host       all             @admins         ::1/128                  trust
hostssl    all             all             all                      cert map=certmap
host       all             all             0.0.0.0/0                reject
"""


@pytest.fixture
def hba_path(write: WriteFile) -> Path:
    write("# admins, one or more per line\nops, dba\n\nroot\n", "admins")
    return write(HBA, "pg_hba.conf")


@pytest.mark.parametrize(
    ("conn", "database", "user", "address", "method"),
    [
        ("local", "anything", "postgres", None, "peer"),
        ("local", "bob", "bob", None, "trust"),  # sameuser
        ("local", "other", "bob", None, None),  # no local rule matches
        ("hostssl", "app", "app_user", "10.1.200.3", "scram-sha-256"),
        ("hostssl", "Mixed Db", "app_user", "10.1.0.1", "scram-sha-256"),
        ("host", "app", "app_user", "10.1.2.9", "md5"),  # the hostssl rule needs TLS
        ("hostnossl", "app", "someone", "10.1.2.250", "md5"),
        ("host", "app", "someone", "10.1.3.1", "reject"),
        ("host", "x", "y", "192.168.0.10", "password"),
        ("hostssl", "x", "y", "192.168.0.10", "cert"),  # hostnossl skipped under TLS
        ("host", "x", "dba", "::1", "trust"),  # @admins file
        ("host", "x", "root", "::1", "trust"),
        ("host", "x", "nobody", "::1", None),  # nothing for IPv6 afterwards
        ("host", "x", "y", "::ffff:10.1.3.1", "reject"),  # IPv4-mapped address
        ("hostssl", "x", "y", "2001:db8::1", "cert"),  # "all" address
    ],
)
def test_hba_match(
    hba_path: Path, conn: str, database: str, user: str, address: str | None, method: str | None
) -> None:
    rules = load_hba_file(hba_path)
    assert rules.match(conn, database, user, address) == method  # type: ignore[arg-type]


def test_hba_rule_details(hba_path: Path) -> None:
    rules = load_hba_file(hba_path)
    assert len(rules.rules) == 9
    netmask_rule = rules.rules[3]
    assert netmask_rule.network == ipaddress.ip_network("10.1.2.0/24")
    assert netmask_rule.source == f"{hba_path}:5"
    cert = rules.find("hostssl", "db", "u", ipaddress.ip_address("203.0.113.5"))
    assert cert is not None
    assert dict(cert.options) == {"map": "certmap"}


def test_hba_replication_connections(hba_path: Path) -> None:
    rules = load_hba_file(hba_path)
    assert rules.match("host", "db", "replicator", "10.9.1.1", replication=True) == "scram-sha-256"
    assert rules.match("host", "replication", "replicator", "10.9.1.1") == "reject"


def test_hba_match_rejects_bad_arguments(hba_path: Path) -> None:
    rules = load_hba_file(hba_path)
    with pytest.raises(ValueError, match="conn_type"):
        rules.match("tcp", "db", "u", "10.0.0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="client address"):
        rules.match("host", "db", "u")


def test_hba_quoted_all_is_a_name() -> None:
    rules = parse_hba('local "all" all trust\n')
    assert rules.match("local", "all", "u") == "trust"
    assert rules.match("local", "other", "u") is None


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("hostgssenc all all 10.0.0.0/8 md5", "not a connection type"),
        ("host all all 10.0.0.0/8 ident", "not a supported method"),
        ("host all all example.com md5", "not an IP address or network"),
        ("host all all samenet md5", "not an IP address or network"),
        ("host all all 10.0.0.0/33 md5", "not an IP address or network"),
        ("host all all 10.0.0.1 md5", "needs a /prefix length or a netmask"),
        ("host all all 10.0.0.0 255.0.255.0 md5", "not a netmask"),
        ("host all all 10.0.0.0/8 peer", "only on local connections"),
        ("host all +admins 10.0.0.0/8 md5", "group membership is not supported"),
        ("host samerole all 10.0.0.0/8 md5", "group membership is not supported"),
        ("host all all 10.0.0.0/8 md5 clientcert=verify-full", "unsupported option"),
        ('host "all all 10.0.0.0/8 md5', "unterminated quoted name"),
        ("host all", "missing user"),
        ("host all all", "missing client address"),
        ("local all all", "missing authentication method"),
        ("host db, all 10.0.0.0/8 md5", "not an IP address"),
        ("local all @missing-file trust", "cannot read"),
    ],
)
def test_bad_hba_line(line: str, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_hba(f"# ok\nlocal all all trust\n{line}\n", tmp_path / "hba.conf")
    assert caught.value.setting == "auth_hba_file"
    assert caught.value.source == f"{tmp_path / 'hba.conf'}:3"
    assert fragment in str(caught.value)
