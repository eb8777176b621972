"""The clients' own protocol helpers: URLs, backoff, sizes (the protocol itself: tests/wire)."""

from itertools import islice

import pytest

from client.protocol import backoff_delays, http_base, parse_size, with_token


def test_token_goes_into_the_query_once():
    assert with_token("ws://h:1/ws", None) == "ws://h:1/ws"
    assert with_token("ws://h:1/ws", "a b") == "ws://h:1/ws?token=a+b"
    assert with_token("ws://h:1/ws?token=old&x=1", "new") == "ws://h:1/ws?x=1&token=new"


def test_http_base_of_ws_urls():
    assert http_base("ws://127.0.0.1:8000/ws?token=t") == "http://127.0.0.1:8000"
    assert http_base("wss://example.org/ws") == "https://example.org"
    with pytest.raises(ValueError, match="ws://"):
        http_base("http://example.org/ws")


def test_backoff_grows_and_caps():
    assert list(islice(backoff_delays(0.5, 2.0, 3.0), 5)) == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        next(backoff_delays(0.0))


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size("64X32") == (64, 32)
    for bad in ("640", "0x10", "ax4", "-1x3"):
        with pytest.raises(ValueError):
            parse_size(bad)
