import json
from itertools import islice

import pytest

from client.protocol import (
    ErrorEvent,
    Hello,
    ProtocolError,
    Stats,
    backoff_delays,
    close_is_fatal,
    http_base,
    params_message,
    parse_event,
    parse_size,
    prompt_message,
    with_token,
)


def test_token_goes_into_the_query_once():
    assert with_token("ws://h:1/ws", None) == "ws://h:1/ws"
    assert with_token("ws://h:1/ws", "a b") == "ws://h:1/ws?token=a+b"
    assert with_token("ws://h:1/ws?token=old&x=1", "new") == "ws://h:1/ws?x=1&token=new"


def test_http_base_of_ws_urls():
    assert http_base("ws://127.0.0.1:8000/ws?token=t") == "http://127.0.0.1:8000"
    assert http_base("wss://example.org/ws") == "https://example.org"
    with pytest.raises(ValueError, match="ws://"):
        http_base("http://example.org/ws")


def test_control_messages():
    assert json.loads(prompt_message("a cat")) == {"type": "prompt", "prompt": "a cat"}
    assert json.loads(prompt_message("a cat", "blurry"))["negative_prompt"] == "blurry"
    assert json.loads(params_message(guidance_scale=1.2)) == {"type": "params", "guidance_scale": 1.2}
    with pytest.raises(ValueError):
        params_message(type="prompt")


def test_parse_events():
    hello = parse_event('{"type":"hello","session_id":"s1","width":64,"height":48,"max_in_flight":2}')
    assert hello == Hello("s1", 64, 48, 2)
    stats = parse_event('{"type":"stats","dropped":3,"fps":9.5}')
    assert isinstance(stats, Stats) and stats.dropped == 3 and stats.fields["fps"] == 9.5
    assert parse_event('{"type":"error","code":"bad_image","message":"no"}') == ErrorEvent("bad_image", "no")
    assert parse_event('{"type":"future_event"}') is None


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"type":"hello","session_id":"s"}',
    '{"type":"hello","session_id":"s","width":0,"height":4,"max_in_flight":1}',
    '{"type":"error","message":"no code"}', '{"type":"stats","dropped":"many"}',
])
def test_malformed_events_raise(text):
    with pytest.raises(ProtocolError):
        parse_event(text)


def test_backoff_grows_and_caps():
    assert list(islice(backoff_delays(0.5, 2.0, 3.0), 5)) == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        next(backoff_delays(0.0))


def test_only_hopeless_close_codes_stop_reconnecting():
    assert close_is_fatal(1009) and close_is_fatal(1008)
    assert not close_is_fatal(1013) and not close_is_fatal(1006) and not close_is_fatal(None)


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    assert parse_size("64X32") == (64, 32)
    for bad in ("640", "0x10", "ax4", "-1x3"):
        with pytest.raises(ValueError):
            parse_size(bad)
