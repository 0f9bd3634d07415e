"""PgBouncer's two credential files: ``auth_file`` (userlist.txt) and ``auth_hba_file``.

Both parsers are pure: they take text (or read one file) and return frozen objects, or
raise :class:`~millpond.errors.ConfigError` naming the file and line of the first bad
entry. PgBouncer itself logs such lines and skips them; a proxy that silently drops a
user or an access rule is worse than one that refuses to start, so millpond refuses.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, cast, get_args

from millpond.errors import ConfigError

#: characters C's ``isspace`` accepts, which PgBouncer's parsers skip
WHITESPACE = " \t\n\r\v\f"

SecretKind = Literal["plain", "md5", "scram-sha-256"]
ConnType = Literal["local", "host", "hostssl", "hostnossl"]
HbaMethod = Literal["trust", "reject", "md5", "password", "scram-sha-256", "peer", "cert"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CONN_TYPES: tuple[str, ...] = get_args(ConnType)
HBA_METHODS: tuple[str, ...] = get_args(HbaMethod)
_MAX_NAME_FILE_DEPTH = 10


def scan_quoted(text: str, start: int) -> tuple[str, int] | None:
    """Read the quoted string opening at ``text[start]``; a doubled quote is a literal one.

    Returns the unquoted value and the index just past the closing quote, or ``None``
    when the closing quote is missing.
    """
    quote, pos = text[start], start + 1
    out: list[str] = []
    while pos < len(text):
        char = text[pos]
        if char == quote:
            if text[pos + 1 : pos + 2] != quote:
                return "".join(out), pos + 1
            pos += 1
        out.append(char)
        pos += 1
    return None


def read_text_file(path: Path, setting: str, source: str | None) -> str:
    """Read a UTF-8 text file, turning any failure into a ConfigError about ``setting``."""
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(setting, f"cannot read {str(path)!r}: {reason}", source=source) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(setting, "the file is not valid UTF-8", source=f"{path}:{line}") from None


# --------------------------------------------------------------------------- auth_file


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """The parts of a stored ``SCRAM-SHA-256$<iter>:<salt>$<storedkey>:<serverkey>``."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


@dataclass(frozen=True, slots=True)
class AuthEntry:
    """One user of the auth file; ``secret`` is never shown in ``repr``."""

    user: str
    secret: str = field(repr=False)
    kind: SecretKind
    source: str
    scram: ScramSecret | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AuthFile:
    """Every user of an auth file, by name (a later line for the same user wins)."""

    entries: Mapping[str, AuthEntry]
    source: Path | None = None

    def get(self, user: str) -> AuthEntry | None:
        """The entry for ``user``, or ``None`` when the file does not list it."""
        return self.entries.get(user)

    def __contains__(self, user: object) -> bool:
        return user in self.entries

    def __len__(self) -> int:
        return len(self.entries)


_MD5 = re.compile(r"md5[0-9a-fA-F]{32}")
_SCRAM = re.compile(r"SCRAM-SHA-256\$([0-9]+):([^$:]+)\$([^$:]+):([^$:]+)")
_SCRAM_KEY_LEN = 32


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError(f"the SCRAM {what} is not valid base64") from None


def parse_scram_secret(secret: str) -> ScramSecret:
    """Split a stored SCRAM-SHA-256 secret into its parts; ValueError when malformed."""
    match = _SCRAM.fullmatch(secret)
    if match is None:
        raise ValueError(
            "malformed SCRAM secret: expected "
            "SCRAM-SHA-256$<iterations>:<salt>$<storedkey>:<serverkey>"
        )
    iterations = int(match[1])
    if iterations < 1:
        raise ValueError("the SCRAM iteration count must be at least 1")
    keys = _b64(match[3], "stored key"), _b64(match[4], "server key")
    if any(len(key) != _SCRAM_KEY_LEN for key in keys):
        raise ValueError(f"SCRAM stored and server keys must be {_SCRAM_KEY_LEN} bytes each")
    return ScramSecret(iterations, _b64(match[2], "salt"), keys[0], keys[1])


def classify_secret(secret: str) -> SecretKind:
    """Tell what an auth file secret is, the way PgBouncer does; ValueError when malformed.

    ``md5`` followed by 32 characters is an MD5 hash (and must be hex); a value starting
    with ``SCRAM-SHA-256$`` is a SCRAM secret (and must parse); anything else is a plain
    text password.
    """
    if secret.startswith("SCRAM-SHA-256$"):
        parse_scram_secret(secret)
        return "scram-sha-256"
    if len(secret) == len("md5") + 32 and secret.startswith("md5"):
        if not _MD5.fullmatch(secret):
            raise ValueError("malformed MD5 hash: expected 'md5' followed by 32 hex digits")
        return "md5"
    return "plain"


def _auth_fail(message: str, source: str) -> ConfigError:
    return ConfigError("auth_file", message, source=source)


def _quoted_field(text: str, pos: int, what: str, source: str) -> tuple[str, int]:
    if pos >= len(text) or text[pos] != '"':
        raise _auth_fail(f'expected the {what} in double quotes, like "user" "secret"', source)
    found = scan_quoted(text, pos)
    if found is None:
        raise _auth_fail(f"unterminated quoted {what}", source)
    return found


def _auth_entry(line: str, source: str) -> AuthEntry | None:
    text = line.strip(WHITESPACE)
    if not text or text[0] in ";#":
        return None
    user, pos = _quoted_field(text, 0, "user name", source)
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    secret, _ = _quoted_field(text, pos, "secret", source)
    if not user:
        raise _auth_fail("empty user name", source)
    try:
        kind = classify_secret(secret)
    except ValueError as exc:
        raise _auth_fail(f"user {user!r}: {exc}", source) from None
    scram = parse_scram_secret(secret) if kind == "scram-sha-256" else None
    md5 = secret.lower() if kind == "md5" else secret
    return AuthEntry(user=user, secret=md5, kind=kind, source=source, scram=scram)


def parse_auth_file(text: str, path: Path | str = "<auth_file>") -> AuthFile:
    """Parse userlist.txt text: ``"user" "secret"`` per line, ``;`` or ``#`` comments."""
    entries: dict[str, AuthEntry] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        entry = _auth_entry(line, f"{path}:{number}")
        if entry is not None:
            entries[entry.user] = entry
    return AuthFile(MappingProxyType(entries), Path(path))


def load_auth_file(path: Path | str, *, source: str | None = None) -> AuthFile:
    """Read and parse an auth file; ``source`` says where its name was configured."""
    path = Path(path)
    return parse_auth_file(read_text_file(path, "auth_file", source), path)


# --------------------------------------------------------------------------- auth_hba_file


@dataclass(frozen=True, slots=True)
class HbaNames:
    """The database or user column of one HBA rule."""

    any: bool = False
    sameuser: bool = False
    replication: bool = False
    names: frozenset[str] = frozenset()

    def matches(self, name: str, other: str, *, replication: bool = False) -> bool:
        """Whether ``name`` matches; ``other`` is the user for ``sameuser``."""
        if replication:
            return self.replication
        if self.any or name in self.names:
            return True
        return self.sameuser and name == other


@dataclass(frozen=True, slots=True)
class HbaRule:
    """One line of the HBA file. ``network`` is ``None`` for ``local`` and ``all``."""

    conn_type: ConnType
    databases: HbaNames
    users: HbaNames
    network: IPNetwork | None
    method: HbaMethod
    options: Mapping[str, str]
    source: str

    def matches(
        self,
        conn_type: ConnType,
        database: str,
        user: str,
        address: IPAddress | None,
        *,
        replication: bool = False,
    ) -> bool:
        """Whether a connection with these properties falls under this rule."""
        if not _type_matches(self.conn_type, conn_type):
            return False
        if self.network is not None and (address is None or address not in self.network):
            return False
        if not self.databases.matches(database, user, replication=replication):
            return False
        return self.users.matches(user, database)


def _type_matches(rule_type: ConnType, conn_type: ConnType) -> bool:
    if conn_type == "local" or rule_type == "local":
        return conn_type == rule_type
    return rule_type == "host" or (rule_type == "hostssl") == (conn_type == "hostssl")


def _client_address(conn_type: str, address: str | IPAddress | None) -> IPAddress | None:
    if conn_type not in CONN_TYPES:
        raise ValueError(f"conn_type must be one of {', '.join(CONN_TYPES)}, got {conn_type!r}")
    if conn_type == "local":
        return None
    if address is None:
        raise ValueError(f"a {conn_type} connection needs the client address")
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class HbaRules:
    """The rules of an HBA file, in order; the first matching rule decides."""

    rules: tuple[HbaRule, ...]
    source: Path | None = None

    def find(
        self,
        conn_type: ConnType,
        database: str,
        user: str,
        address: str | IPAddress | None = None,
        *,
        replication: bool = False,
    ) -> HbaRule | None:
        """The first rule matching the connection, or ``None`` (meaning: reject).

        ``conn_type`` describes the connection, not a rule: ``local`` for a Unix socket,
        ``hostssl`` for TCP with TLS, ``host`` or ``hostnossl`` for TCP without TLS.
        """
        ip = _client_address(conn_type, address)
        for rule in self.rules:
            if rule.matches(conn_type, database, user, ip, replication=replication):
                return rule
        return None

    def match(
        self,
        conn_type: ConnType,
        database: str,
        user: str,
        address: str | IPAddress | None = None,
        *,
        replication: bool = False,
    ) -> HbaMethod | None:
        """The authentication method for the connection, or ``None`` when no rule matches."""
        rule = self.find(conn_type, database, user, address, replication=replication)
        return rule.method if rule is not None else None


_Token = tuple[Literal["word", "quoted", "comma"], str]
_WORD = re.compile(r'[^\s,#"]+')


def _hba_fail(message: str, source: str) -> ConfigError:
    return ConfigError("auth_hba_file", message, source=source)


def _tokenize(line: str, source: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while True:
        while pos < len(line) and line[pos] in WHITESPACE:
            pos += 1
        if pos >= len(line) or line[pos] == "#":
            return tokens
        if line[pos] == ",":
            tokens.append(("comma", ","))
            pos += 1
        elif line[pos] == '"':
            found = scan_quoted(line, pos)
            if found is None:
                raise _hba_fail("unterminated quoted name", source)
            tokens.append(("quoted", found[0]))
            pos = found[1]
        else:
            word = _WORD.match(line, pos)
            assert word is not None  # the first character is none of the above
            tokens.append(("word", word.group()))
            pos = word.end()


@dataclass
class _Cursor:
    """Walks the tokens of one HBA line."""

    tokens: list[_Token]
    source: str
    base_dir: Path
    pos: int = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, what: str) -> _Token:
        token = self.peek()
        if token is None or token[0] == "comma":
            raise _hba_fail(f"missing {what}", self.source)
        self.pos += 1
        return token


@dataclass
class _NameSet:
    """Mutable collector behind :class:`HbaNames`."""

    any: bool = False
    sameuser: bool = False
    replication: bool = False
    names: set[str] = field(default_factory=set)


def _add_name(found: _NameSet, token: _Token, is_db: bool, cur: _Cursor, depth: int) -> None:
    kind, text = token
    if kind == "quoted":
        found.names.add(text)
    elif text == "all":
        found.any = True
    elif is_db and text in ("sameuser", "replication"):
        setattr(found, text, True)
    elif (is_db and text in ("samerole", "samegroup")) or text.startswith("+"):
        raise _hba_fail(f"{text!r}: group membership is not supported", cur.source)
    elif text.startswith("@"):
        _add_name_file(found, cur.base_dir / text[1:], is_db, cur, depth)
    else:
        found.names.add(text)


def _add_name_file(found: _NameSet, path: Path, is_db: bool, cur: _Cursor, depth: int) -> None:
    if depth >= _MAX_NAME_FILE_DEPTH:
        raise _hba_fail(f"@ files nested more than {_MAX_NAME_FILE_DEPTH} deep", cur.source)
    text = read_text_file(path, "auth_hba_file", cur.source)
    for number, line in enumerate(text.split("\n"), start=1):
        sub = _Cursor([], f"{path}:{number}", path.parent)
        for token in _tokenize(line, sub.source):
            if token[0] != "comma":
                _add_name(found, token, is_db, sub, depth + 1)


def _names(cur: _Cursor, what: str, *, is_db: bool) -> HbaNames:
    found = _NameSet()
    while True:
        _add_name(found, cur.take(what), is_db, cur, 0)
        token = cur.peek()
        if token is None or token[0] != "comma":
            return HbaNames(found.any, found.sameuser, found.replication, frozenset(found.names))
        cur.pos += 1


def _prefix_of_mask(address: IPAddress, mask_text: str, source: str) -> int:
    try:
        mask = ipaddress.ip_address(mask_text)
    except ValueError:
        raise _hba_fail(
            f"address {str(address)!r} needs a /prefix length or a netmask", source
        ) from None
    width, bits = address.max_prefixlen, int(mask)
    prefix = bin(bits).count("1")
    if mask.version != address.version or bits != ((1 << width) - 1) ^ ((1 << width - prefix) - 1):
        raise _hba_fail(f"{mask_text!r} is not a netmask for {address}", source)
    return prefix


def _network(cur: _Cursor) -> IPNetwork | None:
    kind, text = cur.take("client address")
    if kind == "word" and text == "all":
        return None
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _hba_fail(
            f"{text!r} is not an IP address or network (host names, samehost and samenet "
            "are not supported)",
            cur.source,
        ) from None
    prefix = _prefix_of_mask(address, cur.take("netmask")[1], cur.source)
    return ipaddress.ip_network((address, prefix), strict=False)


def _method(cur: _Cursor, conn_type: str) -> HbaMethod:
    kind, text = cur.take("authentication method")
    if kind != "word" or text not in HBA_METHODS:
        raise _hba_fail(
            f"{text!r} is not a supported method; use one of {', '.join(HBA_METHODS)}",
            cur.source,
        )
    if text == "peer" and conn_type != "local":
        raise _hba_fail("peer authentication works only on local connections", cur.source)
    return cast(HbaMethod, text)


def _options(cur: _Cursor) -> Mapping[str, str]:
    options: dict[str, str] = {}
    while (token := cur.peek()) is not None:
        cur.pos += 1
        key, sep, value = token[1].partition("=")
        if token[0] == "word" and sep and not value and (nxt := cur.peek()) and nxt[0] == "quoted":
            value = nxt[1]
            cur.pos += 1
        if token[0] != "word" or not sep or key != "map" or not value:
            raise _hba_fail(f"unsupported option {token[1]!r}; only map=NAME is", cur.source)
        options[key] = value
    return MappingProxyType(options)


def _hba_rule(line: str, source: str, base_dir: Path) -> HbaRule | None:
    tokens = _tokenize(line, source)
    if not tokens:
        return None
    cur = _Cursor(tokens, source, base_dir)
    kind, conn_type = cur.take("connection type")
    if kind != "word" or conn_type not in CONN_TYPES:
        raise _hba_fail(
            f"{conn_type!r} is not a connection type; use one of {', '.join(CONN_TYPES)}",
            source,
        )
    databases = _names(cur, "database", is_db=True)
    users = _names(cur, "user", is_db=False)
    network = None if conn_type == "local" else _network(cur)
    method = _method(cur, conn_type)
    options = _options(cur)
    return HbaRule(cast(ConnType, conn_type), databases, users, network, method, options, source)


def parse_hba(text: str, path: Path | str = "<auth_hba_file>") -> HbaRules:
    """Parse HBA file text (``@file`` names are read relative to ``path``'s directory)."""
    path = Path(path)
    rules = []
    for number, line in enumerate(text.split("\n"), start=1):
        rule = _hba_rule(line, f"{path}:{number}", path.parent)
        if rule is not None:
            rules.append(rule)
    return HbaRules(tuple(rules), path)


def load_hba_file(path: Path | str, *, source: str | None = None) -> HbaRules:
    """Read and parse an HBA file; ``source`` says where its name was configured."""
    path = Path(path)
    return parse_hba(read_text_file(path, "auth_hba_file", source), path)
