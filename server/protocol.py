"""The WebSocket and REST message contract (docs/server.md): pydantic models for every message.

Client → server text messages are `prompt` and `params`; server → client text events are `hello`,
`stats` and `error`. Binary messages are encoded frames in and JPEG frames out and need no model.
Incoming models forbid unknown fields and are strict about types, so `"1.5"` is not a float.
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
    model_validator,
)

from engine import EngineConfig
from engine.config import HOT_PARAMS

#: Close codes (RFC 6455) the server uses.
CLOSE_POLICY_VIOLATION = 1008  # missing or wrong token
CLOSE_TOO_BIG = 1009  # a message over the size limit
CLOSE_TRY_AGAIN_LATER = 1013  # server full, or the model is not loaded yet
CLOSE_IDLE = 4408  # the session sent nothing for `idle_timeout_s` (an application code, after HTTP 408)

#: Error codes of a frame that could not be used; each replaces that frame's JPEG answer.
FRAME_ERROR_CODES = frozenset({"empty_frame", "unsupported_format", "bad_image", "image_too_large",
                               "inference_failed"})


#: A close frame's reason may hold at most 123 bytes of UTF-8 (RFC 6455 §5.5).
MAX_CLOSE_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame, without splitting a UTF-8 character."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


class ProtocolError(ValueError):
    """A client message the server cannot use; `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


#: Most items any list parameter may hold (e.g. `t_index_list`, `adacache_codebook`): the engine validates the
#: real bounds, this keeps a hostile message from making the validators walk a huge list.
MAX_LIST_ITEMS = 64


def _valid_unicode(text: str) -> str:
    """`text` if it encodes as UTF-8; JSON can carry lone surrogates (`"\\ud800"`), which the tokenizer cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from error
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]


class _Incoming(BaseModel):
    # NaN and ±Infinity are valid Python JSON but no valid parameter value (a NaN guidance scale gives black frames).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PromptUpdate(_Incoming):
    """New prompt for a live session (REST body of `POST /api/sessions/{id}/prompt`)."""

    prompt: Text
    negative_prompt: Text | None = None

    def engine_params(self) -> dict[str, object]:
        """Keyword arguments for `StreamEngine.update_params`."""
        params: dict[str, object] = {"prompt": self.prompt}
        if self.negative_prompt is not None:
            params["negative_prompt"] = self.negative_prompt
        return params


_STRICT = {str: Text, int: StrictInt, float: StrictFloat, bool: StrictBool}


def _strict(hint: Any) -> Any:
    """`hint` with strict scalars, so `"1.5"` is no float and `1` no bool; JSON arrays still fill tuples, and
    variable-length ones hold at most `MAX_LIST_ITEMS` items."""
    if hint in _STRICT:
        return _STRICT[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return Union[tuple(_strict(arg) for arg in args)]  # noqa: UP007 (built from a tuple)
    if origin is tuple:
        strict = tuple[tuple(arg if arg is Ellipsis else _strict(arg) for arg in args)]
        return Annotated[strict, Field(max_length=MAX_LIST_ITEMS)] if Ellipsis in args else strict
    return hint


class _ParamsBase(_Incoming):
    @model_validator(mode="after")
    def _names_a_parameter(self) -> _ParamsBase:
        if not self.engine_params():
            raise ValueError("name at least one parameter")
        return self

    def engine_params(self) -> dict[str, object]:
        """Keyword arguments for `StreamEngine.update_params` (only the fields given)."""
        return self.model_dump(exclude_none=True, exclude={"type"})


#: The parameters a session may change while streaming: the engine's hot set plus a clean re-prepare
#: of the schedule (width/height stay fixed for a session because `hello` announced them).
UPDATABLE_PARAMS: frozenset[str] = HOT_PARAMS | {"t_index_list"}
_ENGINE_TYPES = get_type_hints(EngineConfig)

#: Hot parameters of a live session (REST body of `PATCH /api/sessions/{id}/params`): every field of
#: `UPDATABLE_PARAMS`, typed as in `EngineConfig`, optional, at least one given. Built from the engine's
#: own lists so a new hot parameter is updatable without touching the server.
ParamsUpdate = create_model(
    "ParamsUpdate", __base__=_ParamsBase, __doc__=_ParamsBase.__doc__,
    **{name: (_strict(_ENGINE_TYPES[name]) | None, None) for name in sorted(UPDATABLE_PARAMS)},
)


class PromptMessage(PromptUpdate):
    """`{"type": "prompt", "prompt": "...", "negative_prompt": "..."}`."""

    type: Literal["prompt"]


class ParamsMessage(ParamsUpdate):
    """`{"type": "params", ...}` with any of `ParamsUpdate`'s fields."""

    type: Literal["params"]


ClientMessage = PromptMessage | ParamsMessage
_CLIENT_MESSAGES: dict[str, type[PromptMessage] | type[ParamsMessage]] = {
    "prompt": PromptMessage, "params": ParamsMessage}


class HelloEvent(BaseModel):
    """First message of every session."""

    type: Literal["hello"] = "hello"
    session_id: str
    width: int
    height: int
    max_in_flight: int


class StatsEvent(BaseModel):
    """Sent about every `stats_interval_s` while a session is active.

    `fps` and `latency_ms` cover the session's recent outputs (latency is server-side: frame received →
    answer sent); the counters are totals since the session began.
    """

    type: Literal["stats"] = "stats"
    fps: float
    latency_ms: float | None
    inference_ms: float | None
    frames_in: int
    frames_out: int
    dropped: int
    skipped: int
    errors: int
    in_flight: int


class ErrorEvent(BaseModel):
    """Bad input; the stream goes on."""

    type: Literal["error"] = "error"
    code: str
    message: str


def check_prompt_length(update: PromptUpdate | _ParamsBase, max_chars: int) -> None:
    """Raise `ProtocolError("prompt_too_long")` if a prompt or negative prompt exceeds `max_chars`."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(update, name)
        if text is not None and len(text) > max_chars:
            raise ProtocolError("prompt_too_long", f"`{name}` has {len(text)} characters; the limit is {max_chars}")


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field, e.g. `guidance_scale: Input should be a valid number`."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "message"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def _json_object(text: str | bytes) -> dict:
    """The JSON object in `text`; `ProtocolError` for anything else, however hostile."""
    try:
        data = json.loads(text)
    except RecursionError as error:  # e.g. "[" * 100000
        raise ProtocolError("invalid_json", "not valid JSON: nested too deeply") from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise ProtocolError("invalid_json", f"not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", f"a message must be a JSON object, got {type(data).__name__}")
    return data


def _validated(model: type[_Incoming], data: dict, max_prompt_chars: int) -> Any:
    try:
        message = model.model_validate(data)
    except ValidationError as error:
        raise ProtocolError("invalid_message", describe_validation_error(error)) from error
    except RecursionError as error:  # a deeply nested value inside a valid object
        raise ProtocolError("invalid_message", "a value is nested too deeply") from error
    check_prompt_length(message, max_prompt_chars)
    return message


def parse_client_message(text: str, max_prompt_chars: int) -> ClientMessage:
    """Parse one text message from a client.

    Raises:
        ProtocolError: `invalid_json`, `unknown_message_type`, `invalid_message` (wrong types, unknown or
            missing fields, non-finite numbers, invalid Unicode) or `prompt_too_long`.
    """
    data = _json_object(text)
    kind = data.get("type")
    model = _CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError("unknown_message_type",
                            f"unknown message type {kind!r}; expected one of {sorted(_CLIENT_MESSAGES)}")
    return _validated(model, data, max_prompt_chars)


def parse_request_body(body: bytes, model: type[PromptUpdate] | type[_ParamsBase], max_prompt_chars: int) -> Any:
    """Parse a REST request body as `model` (`PromptUpdate` or `ParamsUpdate`), with the WebSocket's rules.

    Raises:
        ProtocolError: as `parse_client_message`.
    """
    return _validated(model, _json_object(body), max_prompt_chars)
