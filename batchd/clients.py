"""Who is calling: bearer tokens, the client each one names, its callback settings.

Three sources, used together:

- ``BATCHD_INGEST_TOKENS``: comma-separated entries. ``name=token`` names the
  client; a plain ``token`` (no name) belongs to the client ``local``, the
  client of every task when no token is configured at all, so tasks stored
  before clients existed stay readable by the same tokens. An entry whose
  part after the first ``=`` is empty or only ``=`` (base64 padding) stays a
  plain token, so existing tokens keep working.
- ``BATCHD_ADMIN_TOKENS``: ``name=token`` entries of admin clients, which see
  and act on every client's tasks (a plain token here is refused: an admin
  must be named).
- ``BATCHD_INGEST_TOKENS_FILE``: a TOML file, one table per client::

      [clients.billing]
      tokens = ["tok-new", "tok-old"]      # or token = "..."; several allow rotation
      callback_secret = "a long random string"
      callback_url = "https://billing.internal/batchd"   # optional default
      admin = false                        # true: sees and acts on every client

The ``client`` label on metrics takes only configured names, ``local`` and
``other`` (a task stored under a name no longer configured), so its
cardinality is bounded by the configuration.
"""

from __future__ import annotations

import hmac
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from batchd.config import MIN_SECRET_BYTES, Settings
from batchd.domain import LOCAL, callback_url_problem
from batchd.errors import ConfigError

OTHER = "other"
RESERVED = frozenset({LOCAL, OTHER, "anonymous"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    callback_secret: SecretStr | None = None
    callback_url: str | None = None
    # Sees and acts on every client's tasks (``?client=`` narrows).
    admin: bool = False


def is_client_name(name: str) -> bool:
    """Whether ``name`` could name a client (a configured one, or ``local``)."""
    return _NAME.fullmatch(name) is not None


# Who calls with a plain token.
LOCAL_CLIENT = Client(LOCAL)
# Who calls when no token is configured: the one operator on loopback, whose
# tasks are 'local' and who sees every client's (tasks stored while tokens
# were configured stay reachable).
NO_TOKEN_CLIENT = Client(LOCAL, admin=True)


def parse_inline(raw: str | None) -> list[tuple[str | None, str]]:
    """(client name or None, token) for each BATCHD_INGEST_TOKENS entry."""
    out: list[tuple[str | None, str]] = []
    for entry in (raw or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, token = entry.partition("=")
        if sep and _NAME.fullmatch(name) and token.strip("="):
            out.append((name, token))
        else:
            out.append((None, entry))
    return out


def parse_file(text: str, allowed_hosts: tuple[str, ...]) -> list[tuple[Client, list[str]]]:
    """The clients of a tokens file; ValueError says what is wrong and where."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    unknown = set(doc) - {"clients"}
    if unknown:
        raise ValueError(f"unknown top-level key {sorted(unknown)[0]!r}; use [clients.NAME]")
    clients = doc.get("clients", {})
    if not isinstance(clients, dict):
        raise ValueError("clients must be a table of [clients.NAME] tables")
    out = []
    for name, spec in clients.items():
        out.append(_client_from(name, spec, allowed_hosts))
    return out


def _client_from(name: str, spec: Any, allowed_hosts: tuple[str, ...]) -> tuple[Client, list[str]]:
    where = f"clients.{name}"
    if not _NAME.fullmatch(name) or name in RESERVED:
        raise ValueError(
            f"{where}: a client name is 1-64 letters, digits, '_', '.', '-' and "
            f"not one of {', '.join(sorted(RESERVED))}"
        )
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a table")
    unknown = set(spec) - {"token", "tokens", "callback_secret", "callback_url", "admin"}
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    tokens = spec.get("tokens", [])
    if "token" in spec:
        tokens = [spec["token"], *tokens]
    if not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
        raise ValueError(f'{where}: give token = "..." or tokens = ["..."] (non-empty strings)')
    secret = spec.get("callback_secret")
    if secret is not None and (
        not isinstance(secret, str) or len(secret.encode()) < MIN_SECRET_BYTES
    ):
        raise ValueError(
            f"{where}: callback_secret must be a string of at least "
            f"{MIN_SECRET_BYTES} bytes (`openssl rand -hex 32` makes one)"
        )
    url = spec.get("callback_url")
    if url is not None:
        problem = (
            callback_url_problem(url, allowed_hosts)
            if isinstance(url, str)
            else "must be an http(s) URL string"
        )
        if problem:
            raise ValueError(f"{where}: callback_url {problem}")
    admin = spec.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"{where}: admin must be true or false")
    return Client(name, None if secret is None else SecretStr(secret), url, admin), [
        t.strip() for t in tokens
    ]


class Clients:
    """Token → client lookups, the bounded metric label, callback secrets."""

    def __init__(
        self, entries: Iterable[tuple[Client | None, str]], default_secret: SecretStr | None = None
    ) -> None:
        self._tokens: list[tuple[bytes, Client]] = []
        self._by_name: dict[str, Client] = {}
        seen: set[str] = set()
        for client, token in entries:
            if token in seen:
                raise ConfigError(
                    "BATCHD_INGEST_TOKENS: a token is listed twice; every token "
                    "must name one client"
                )
            seen.add(token)
            self._tokens.append((token.encode(), client or LOCAL_CLIENT))
            if client is not None:
                known = self._by_name.setdefault(client.name, client)
                if known != client:
                    raise ConfigError(
                        f"BATCHD_INGEST_TOKENS: client {client.name!r} is "
                        "configured twice with different settings"
                    )
        self.default_secret = default_secret

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        """Both token sources; a bad file stops the start naming its variable."""
        entries: list[tuple[Client | None, str]] = []
        file_clients: dict[str, Client] = {}
        if settings.ingest_tokens_file is not None:
            path = settings.ingest_tokens_file
            try:
                parsed = parse_file(path.read_text(), settings.callback_hosts)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"BATCHD_INGEST_TOKENS_FILE: {path}: {exc}") from None
            for client, tokens in parsed:
                file_clients[client.name] = client
                entries += [(client, t) for t in tokens]
        inline = settings.ingest_tokens
        for name, token in parse_inline(inline.get_secret_value() if inline else None):
            if name in RESERVED:
                raise ConfigError(
                    f"BATCHD_INGEST_TOKENS: {name!r} is reserved (plain tokens "
                    "belong to 'local'); name the client otherwise"
                )
            # An inline name the file also configures shares its settings.
            named = None if name is None else file_clients.get(name, Client(name))
            entries.append((named, token))
        admins = settings.admin_tokens
        for name, token in parse_inline(admins.get_secret_value() if admins else None):
            if name is None or name in RESERVED:
                raise ConfigError(
                    "BATCHD_ADMIN_TOKENS: give name=token entries (a name that "
                    f"is not one of {', '.join(sorted(RESERVED))})"
                )
            known = file_clients.get(name)
            if known is not None and not known.admin:
                raise ConfigError(
                    f"BATCHD_ADMIN_TOKENS: {name!r} is a client of "
                    "BATCHD_INGEST_TOKENS_FILE without admin = true; a name "
                    "is an admin everywhere or nowhere"
                )
            entries.append((known or Client(name, admin=True), token))
        return cls(entries, settings.callback_secret)

    @property
    def required(self) -> bool:
        """Whether the API asks for a bearer token at all."""
        return bool(self._tokens)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def authenticate(self, given: str) -> Client | None:
        """The client a token names (``local`` for a plain one), None for no
        valid token: every token is compared, in constant time each. A token
        that is not valid UTF-8 (aiohttp keeps such header bytes as
        surrogates) matches nothing."""
        try:
            raw = given.encode()
        except UnicodeEncodeError:
            return None
        found: Client | None = None
        for token, client in self._tokens:
            if hmac.compare_digest(raw, token) and found is None:
                found = client
        return found

    def keys(self) -> list[tuple[bytes, Client | None]]:
        """Every configured token with its client, for checks (such as the
        console's session cookie) that prove knowledge of a token by an HMAC
        keyed with it instead of by presenting it."""
        return list(self._tokens)

    def get(self, name: str | None) -> Client | None:
        return self._by_name.get(name) if name else None

    def label(self, name: str | None) -> str:
        """The metric label for a stored client name: bounded by configuration."""
        if not name or name == LOCAL:
            return LOCAL
        return name if name in self._by_name else OTHER

    def secret_for(self, name: str | None) -> str | None:
        """The key callbacks of this client are signed with."""
        client = self.get(name)
        secret = client.callback_secret if client is not None else None
        secret = secret or self.default_secret
        return secret.get_secret_value() if secret is not None else None
