"""Pure rules of callbacks and client tokens: URL checks, token entries,
tokens files, signatures."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import SecretStr

from batchd.clients import LOCAL_CLIENT, OTHER, Client, Clients, parse_file, parse_inline
from batchd.domain import LOCAL, callback_address_problem, callback_url_problem
from batchd.errors import ConfigError
from batchd.signing import SignatureError, sign, verify

ALLOWED = ("hooks.internal", "*.svc.cluster.local", "10.0.0.0/8", "127.0.0.1:9000")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.internal/batchd", None),
        ("http://HOOKS.internal:8443/x?y=1", None),
        ("https://billing.default.svc.cluster.local/cb", None),
        ("https://svc.cluster.local/cb", "not in BATCHD_CALLBACK_ALLOWED_HOSTS"),
        ("http://10.1.2.3/cb", None),
        ("http://11.1.2.3/cb", "not in BATCHD_CALLBACK_ALLOWED_HOSTS"),
        # Named by host:port, but loopback needs a CIDR entry too.
        ("http://127.0.0.1:9000/cb", "non-public address 127.0.0.1"),
        ("http://127.0.0.1:9001/cb", "not in BATCHD_CALLBACK_ALLOWED_HOSTS"),
        ("http://hooks.internal.evil.com/cb", "not in BATCHD_CALLBACK_ALLOWED_HOSTS"),
        ("ftp://hooks.internal/cb", "must be an http:// or https:// URL"),
        ("hooks.internal/cb", "must be an http:// or https:// URL"),
        ("http:///cb", "must name a host"),
        ("http://a:b@hooks.internal/cb", "must not carry credentials"),
        ("http://hooks.internal:99999/cb", "is not a valid URL"),
        ("https://hooks.internal/" + "x" * 2100, "must be at most 2048 chars"),
    ],
)
def test_callback_url_rules(url: str, problem: str | None) -> None:
    got = callback_url_problem(url, ALLOWED)
    assert got == problem if problem is None else problem in (got or "")


def test_no_allow_list_means_no_callbacks_and_star_means_any_public_host() -> None:
    assert "callbacks are off" in (callback_url_problem("https://a.example/x", ()) or "")
    assert callback_url_problem("https://a.example/x", ("*",)) is None
    assert callback_url_problem("http://8.8.8.8/x", ("*",)) is None
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:8080/v1/tasks",
        "http://10.0.0.5/",
        "http://192.168.1.1/",
        "http://100.100.100.200/",
        "http://0.0.0.0/",
    ):
        assert "non-public address" in (callback_url_problem(url, ("*",)) or ""), url
    assert callback_url_problem("http://127.0.0.1:8080/cb", ("*", "127.0.0.0/8")) is None


@pytest.mark.parametrize(
    ("address", "allowed", "refused"),
    [
        ("93.184.216.34", ("*",), False),
        ("2606:4700::1111", ("*",), False),
        ("127.0.0.1", ("*",), True),
        ("::1", ("*",), True),
        ("::ffff:127.0.0.1", ("*",), True),  # IPv4-mapped loopback
        ("169.254.169.254", ("*",), True),  # cloud metadata
        ("fd00:ec2::254", ("*",), True),  # AWS metadata over IPv6
        ("100.100.100.200", ("*",), True),  # shared address space (Alibaba metadata)
        ("10.1.2.3", ("*",), True),
        ("172.16.0.1", ("*",), True),
        ("224.0.0.1", ("*",), True),
        ("fe80::1", ("*",), True),
        ("10.1.2.3", ("*", "10.0.0.0/8"), False),
        ("127.0.0.1", ("127.0.0.1/32",), False),
        ("::ffff:127.0.0.1", ("127.0.0.0/8",), False),
        ("10.1.2.3", ("10.9.0.0/16",), True),
    ],
)
def test_callback_address_rules(address: str, allowed: tuple[str, ...], refused: bool) -> None:
    problem = callback_address_problem(ipaddress.ip_address(address), allowed)
    assert (problem is not None) == refused, problem


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (None, []),
        ("a, b,,", [(None, "a"), (None, "b")]),
        ("billing=tok1,search=tok2", [("billing", "tok1"), ("search", "tok2")]),
        # Base64 padding keeps a plain token plain (backward compatible).
        ("dG9rZW4=,dG9rZW4h==", [(None, "dG9rZW4="), (None, "dG9rZW4h==")]),
        ("bad name=tok", [(None, "bad name=tok")]),
        ("billing=tok=with=equals", [("billing", "tok=with=equals")]),
    ],
)
def test_inline_token_entries(raw: str | None, parsed: list[tuple[str | None, str]]) -> None:
    assert parse_inline(raw) == parsed


def test_tokens_file_clients() -> None:
    text = """
[clients.billing]
tokens = ["new", "old"]
callback_secret = "0123456789abcdef0123456789abcdef"
callback_url = "https://hooks.internal/billing"

[clients.search]
token = "s"
"""
    parsed = parse_file(text, ALLOWED)
    assert parsed == [
        (
            Client(
                "billing",
                SecretStr("0123456789abcdef0123456789abcdef"),
                "https://hooks.internal/billing",
            ),
            ["new", "old"],
        ),
        (Client("search"), ["s"]),
    ]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[clients.x]\n", "token"),
        (f'[clients.x]\ntoken = "t"\ncallback_secret = "{"x" * 31}"\n', "at least 32 bytes"),
        ('[clients.x]\ntoken = "t"\ncallback_url = "https://evil.example/"\n', "callback_url"),
        ('[clients.x]\ntoken = "t"\ncolour = "red"\n', "unknown key 'colour'"),
        ('[clients.anonymous]\ntoken = "t"\n', "client name"),
        ('[client.x]\ntoken = "t"\n', "unknown top-level key"),
        ("[clients.x\n", "not valid TOML"),
    ],
)
def test_bad_tokens_file_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_file(text, ALLOWED)
    assert says in str(caught.value)


def test_clients_authenticate_label_and_secret() -> None:
    billing = Client("billing", SecretStr("s" * 32))
    clients = Clients(
        [(billing, "tb"), (None, "plain")], default_secret=SecretStr("fallback-secret")
    )
    # Bytes that are not UTF-8 reach us as surrogates: no match, no exception.
    assert clients.authenticate(b"t\xffb".decode(errors="surrogateescape")) is None
    assert clients.authenticate("tb") == billing
    # A plain token is the client 'local', as no-token mode is.
    assert clients.authenticate("plain") == LOCAL_CLIENT
    assert clients.authenticate("nope") is None
    assert [clients.label(n) for n in ("billing", LOCAL, "retired")] == ["billing", LOCAL, OTHER]
    assert clients.secret_for("billing") == "s" * 32
    assert "s" * 32 not in repr(billing)
    assert clients.secret_for(None) == "fallback-secret"
    with pytest.raises(ConfigError):
        Clients([(billing, "tb"), (Client("search"), "tb")])


def test_signature_round_trip_and_what_breaks_it() -> None:
    body = b'{"custom_id": "a"}'
    header = sign("secret", 1_700_000_000, body)
    assert header.startswith("v1=") and len(header) == 3 + 64
    verify("secret", body, "1700000000", header, now=1_700_000_100)
    verify("secret", body, "1700000000", f"v1=00,{header}", now=1_700_000_000)
    for args, now in (
        (("other", body, "1700000000", header), 1_700_000_000),
        (("secret", body + b" ", "1700000000", header), 1_700_000_000),
        (("secret", body, "1700000001", header), 1_700_000_000),
        (("secret", body, "1700000000", header), 1_700_000_301),  # too old: a replay
        (("secret", body, None, header), 1_700_000_000),
        (("secret", body, "soon", header), 1_700_000_000),
    ):
        with pytest.raises(SignatureError):
            verify(*args, now=now)
