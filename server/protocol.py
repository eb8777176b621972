"""The WebSocket and REST message contract (docs/server.md): pydantic models for every message.

Client → server text messages are `prompt` and `params`; server → client text events are `hello`,
`stats` and `error`. Binary messages are encoded frames in and JPEG frames out and need no model.
Incoming models forbid unknown fields and are strict about types, so `"1.5"` is not a float.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

#: Close codes (RFC 6455) the server uses.
CLOSE_POLICY_VIOLATION = 1008  # missing or wrong token
CLOSE_TOO_BIG = 1009  # a message over the size limit
CLOSE_TRY_AGAIN_LATER = 1013  # server full, or the model is not loaded yet

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


class _Incoming(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptUpdate(_Incoming):
    """New prompt for a live session (REST body of `POST /api/sessions/{id}/prompt`)."""

    prompt: str
    negative_prompt: str | None = None

    def engine_params(self) -> dict[str, object]:
        """Keyword arguments for `StreamEngine.update_params`."""
        params: dict[str, object] = {"prompt": self.prompt}
        if self.negative_prompt is not None:
            params["negative_prompt"] = self.negative_prompt
        return params


class ParamsUpdate(_Incoming):
    """Hot parameters of a live session (REST body of `PATCH /api/sessions/{id}/params`).

    Every field is optional, but at least one must be given. `t_index_list` re-prepares the stream
    (new schedule and buffer) between two frames; the rest change nothing but themselves.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    delta: float | None = None
    seed: int | None = None
    similarity_filter: bool | None = None
    similarity_threshold: float | None = None
    max_skip_frames: int | None = None
    t_index_list: list[int] | None = None

    @model_validator(mode="after")
    def _names_a_parameter(self) -> ParamsUpdate:
        if not self.engine_params():
            raise ValueError("name at least one parameter")
        return self

    def engine_params(self) -> dict[str, object]:
        """Keyword arguments for `StreamEngine.update_params` (only the fields given)."""
        params = self.model_dump(exclude_none=True, exclude={"type"})
        if "t_index_list" in params:
            params["t_index_list"] = tuple(params["t_index_list"])
        return params


#: The parameters a session may change while streaming: the engine's hot set plus a clean re-prepare
#: of the schedule (width/height stay fixed for a session because `hello` announced them).
UPDATABLE_PARAMS = frozenset(ParamsUpdate.model_fields)


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


def check_prompt_length(update: PromptUpdate | ParamsUpdate, max_chars: int) -> None:
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


def parse_client_message(text: str, max_prompt_chars: int) -> ClientMessage:
    """Parse one text message from a client.

    Raises:
        ProtocolError: `invalid_json`, `unknown_message_type`, `invalid_message` (wrong types, unknown or
            missing fields) or `prompt_too_long`.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError("invalid_json", f"not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", f"a message must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    model = _CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError("unknown_message_type",
                            f"unknown message type {kind!r}; expected one of {sorted(_CLIENT_MESSAGES)}")
    try:
        message = model.model_validate(data)
    except ValidationError as error:
        raise ProtocolError("invalid_message", describe_validation_error(error)) from error
    check_prompt_length(message, max_prompt_chars)
    return message
