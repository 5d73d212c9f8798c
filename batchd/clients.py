"""Who is calling: bearer tokens, the client each one names, its callback settings.

Two sources, used together:

- ``BATCHD_INGEST_TOKENS``: comma-separated entries. A plain ``token`` is
  anonymous (metric label ``anonymous``), as before; ``name=token`` names the
  client. An entry whose part after the first ``=`` is empty or only ``=``
  (base64 padding) stays a plain token, so existing tokens keep working.
- ``BATCHD_INGEST_TOKENS_FILE``: a TOML file, one table per client::

      [clients.billing]
      tokens = ["tok-new", "tok-old"]      # or token = "..."; several allow rotation
      callback_secret = "a long random string"
      callback_url = "https://billing.internal/batchd"   # optional default

The ``client`` label on metrics takes only configured names, ``anonymous``
and ``other`` (a task stored under a name no longer configured), so its
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
from batchd.domain import callback_url_problem
from batchd.errors import ConfigError

ANONYMOUS = "anonymous"
OTHER = "other"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    callback_secret: SecretStr | None = None
    callback_url: str | None = None


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


def _client_from(name: str, spec: Any, allowed_hosts: tuple[str, ...]
                 ) -> tuple[Client, list[str]]:
    where = f"clients.{name}"
    if not _NAME.fullmatch(name) or name in (ANONYMOUS, OTHER):
        raise ValueError(f"{where}: a client name is 1-64 letters, digits, '_', '.', '-' and "
                         f"not {ANONYMOUS!r} or {OTHER!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a table")
    unknown = set(spec) - {"token", "tokens", "callback_secret", "callback_url"}
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    tokens = spec.get("tokens", [])
    if "token" in spec:
        tokens = [spec["token"], *tokens]
    if not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
        raise ValueError(f"{where}: give token = \"...\" or tokens = [\"...\"] (non-empty "
                         "strings)")
    secret = spec.get("callback_secret")
    if secret is not None and (not isinstance(secret, str)
                               or len(secret.encode()) < MIN_SECRET_BYTES):
        raise ValueError(f"{where}: callback_secret must be a string of at least "
                         f"{MIN_SECRET_BYTES} bytes (`openssl rand -hex 32` makes one)")
    url = spec.get("callback_url")
    if url is not None:
        problem = callback_url_problem(url, allowed_hosts) if isinstance(url, str) else \
            "must be an http(s) URL string"
        if problem:
            raise ValueError(f"{where}: callback_url {problem}")
    return Client(name, None if secret is None else SecretStr(secret), url), \
        [t.strip() for t in tokens]


class Clients:
    """Token → client lookups, the bounded metric label, callback secrets."""

    def __init__(self, entries: Iterable[tuple[Client | None, str]],
                 default_secret: SecretStr | None = None) -> None:
        self._tokens: list[tuple[bytes, Client | None]] = []
        self._by_name: dict[str, Client] = {}
        seen: set[str] = set()
        for client, token in entries:
            if token in seen:
                raise ConfigError("BATCHD_INGEST_TOKENS: a token is listed twice; every token "
                                  "must name one client")
            seen.add(token)
            self._tokens.append((token.encode(), client))
            if client is not None:
                known = self._by_name.setdefault(client.name, client)
                if known != client:
                    raise ConfigError(f"BATCHD_INGEST_TOKENS: client {client.name!r} is "
                                      "configured twice with different settings")
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
            if name in (ANONYMOUS, OTHER):
                raise ConfigError(f"BATCHD_INGEST_TOKENS: {name!r} is reserved for the metric "
                                  "label; name the client otherwise")
            # An inline name the file also configures shares its settings.
            named = None if name is None else file_clients.get(name, Client(name))
            entries.append((named, token))
        return cls(entries, settings.callback_secret)

    @property
    def required(self) -> bool:
        """Whether the API asks for a bearer token at all."""
        return bool(self._tokens)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def authenticate(self, given: str) -> tuple[bool, Client | None]:
        """(valid, client): every token is compared, in constant time each.
        A token that is not valid UTF-8 (aiohttp keeps such header bytes as
        surrogates) matches nothing."""
        try:
            raw = given.encode()
        except UnicodeEncodeError:
            return False, None
        found: tuple[bool, Client | None] = (False, None)
        for token, client in self._tokens:
            if hmac.compare_digest(raw, token) and not found[0]:
                found = (True, client)
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
        if not name:
            return ANONYMOUS
        return name if name in self._by_name else OTHER

    def secret_for(self, name: str | None) -> str | None:
        """The key callbacks of this client are signed with."""
        client = self.get(name)
        secret = client.callback_secret if client is not None else None
        secret = secret or self.default_secret
        return secret.get_secret_value() if secret is not None else None

