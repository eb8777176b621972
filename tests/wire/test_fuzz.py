"""Fuzzed input (issue 28 item 5): whatever text or bytes reach the message parsers, and whatever parameter dict
reaches the engine's config, the answer is an event or a clean error, never another exception.

Property-based (hypothesis), in the slow tier and bounded: a fixed number of examples each, no deadline (a loaded
machine must not turn a slow example into a failure).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wire
from engine.config import StreamConfig, live_params
from server.protocol import MessageError, ParamsUpdate, PromptUpdate, parse_client_message, parse_request_body

pytestmark = pytest.mark.slow

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARAM_NAMES = sorted(live_params())
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text()
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.text(max_size=12), children, max_size=5), max_leaves=20)
PARAMS = st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=20), JSON_VALUES, max_size=6)


def _json(value) -> str:
    return json.dumps(value, allow_nan=True)


@BOUNDED
@given(st.text(max_size=2000))
def test_any_text_is_a_client_message_or_a_message_error(text):
    try:
        parse_client_message(text, max_prompt_chars=200)
    except MessageError as error:
        assert error.code in {wire.INVALID_JSON, wire.INVALID_MESSAGE, wire.UNKNOWN_MESSAGE_TYPE,
                              wire.PROMPT_TOO_LONG}


@BOUNDED
@given(st.sampled_from(["prompt", "params", "hello", ""]) | st.text(max_size=10), PARAMS)
def test_any_json_object_is_a_client_message_or_a_message_error(kind, fields):
    try:
        parse_client_message(_json({"type": kind, **fields}), max_prompt_chars=200)
    except MessageError as error:
        assert error.message


@BOUNDED
@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode), st.sampled_from([PromptUpdate, ParamsUpdate]))
def test_any_rest_body_is_an_update_or_a_message_error(body, model):
    try:
        parse_request_body(body, model, max_prompt_chars=200)
    except MessageError as error:
        assert error.message


@BOUNDED
@given(st.text(max_size=1000) | st.sampled_from(["hello", "frame", "dropped", "error", "stats"]).flatmap(
    lambda kind: PARAMS.map(lambda fields: _json({"type": kind, **fields}))))
def test_any_server_text_is_an_event_none_or_a_wire_error(text):
    try:
        wire.parse_event(text)
    except wire.WireError as error:
        assert str(error)


@BOUNDED
@given(PARAMS)
def test_any_parameter_dict_is_a_valid_config_or_a_value_error_naming_a_field(params):
    try:
        config = StreamConfig().updated(**params)
    except ValueError as error:
        assert any(name in str(error) or repr(name) in str(error) for name in params), (params, str(error))
    else:
        assert isinstance(config, StreamConfig)
        assert all(not isinstance(value, float) or math.isfinite(value)
                   for value in config.flat_params().values())
