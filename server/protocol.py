"""Validation of what clients send (docs/server.md): pydantic models of the `prompt` and `params` messages,
shared by the WebSocket and the REST routes.

The events the server sends, the close codes and the error codes live in `wire`, the dependency-free module
the clients import too. Incoming models forbid unknown fields and are strict about types, so `"1.5"` is not a
float; their fields are the engine's stream parameters (`engine.config.STREAM_PARAM_TYPES`).
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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

import wire
from engine.config import LOAD_SETTINGS, STREAM_PARAM_TYPES, live_params


class MessageError(ValueError):
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


class PromptUpdate(_Incoming):
    """New prompt for a live session (REST body of `POST /api/sessions/{id}/prompt`): a `prompt`, a weighted
    `prompts` blend (`[["a fox", 0.7], ["watercolor", 0.3]]`, blended by the session's `prompt_blend`), or both
    (the blend is rendered), and optionally a `negative_prompt`."""

    prompt: Text | None = None
    prompts: _strict(STREAM_PARAM_TYPES["prompts"]) | None = None
    negative_prompt: Text | None = None

    @model_validator(mode="after")
    def _names_a_prompt(self) -> PromptUpdate:
        if self.prompt is None and self.prompts is None:
            raise ValueError("name a `prompt` or a weighted `prompts` list")
        return self

    def engine_params(self) -> dict[str, object]:
        """Keyword arguments for `StreamHandle.update` (only the fields given)."""
        return self.model_dump(exclude_none=True, exclude={"type"})


class _ParamsBase(_Incoming):
    @model_validator(mode="after")
    def _names_a_parameter(self) -> _ParamsBase:
        if not self.engine_params():
            raise ValueError("name at least one parameter")
        return self

    def engine_params(self) -> dict[str, object]:
        """Keyword arguments for `StreamHandle.update` (only the fields given)."""
        return self.model_dump(exclude_none=True, exclude={"type"})


#: The parameters a session may change while streaming: the engine's hot set plus a clean re-prepare
#: of the schedule (width/height stay fixed for a session because `hello` announced them).
UPDATABLE_PARAMS: frozenset[str] = live_params(size_fixed=True)

#: Hot parameters of a live session (REST body of `PATCH /api/sessions/{id}/params`): every field of
#: `UPDATABLE_PARAMS`, typed as in `engine.config.StreamConfig`, optional, at least one given. Built from the engine's
#: own lists so a new hot parameter is updatable without touching the server.
ParamsUpdate = create_model(
    "ParamsUpdate", __base__=_ParamsBase, __doc__=_ParamsBase.__doc__,
    **{name: (_strict(STREAM_PARAM_TYPES[name]) | None, None) for name in sorted(UPDATABLE_PARAMS)},
)


class PromptMessage(PromptUpdate):
    """`{"type": "prompt", "prompt": "...", "negative_prompt": "..."}` or `{"type": "prompt", "prompts": [["a fox",
    0.7], ["watercolor", 0.3]]}`."""

    type: Literal["prompt"]


class ParamsMessage(ParamsUpdate):
    """`{"type": "params", ...}` with any of `ParamsUpdate`'s fields."""

    type: Literal["params"]


ClientMessage = PromptMessage | ParamsMessage
_CLIENT_MESSAGES: dict[str, type[PromptMessage] | type[ParamsMessage]] = {
    "prompt": PromptMessage, "params": ParamsMessage}


def check_prompt_length(update: PromptUpdate | _ParamsBase, max_chars: int) -> None:
    """Raise `MessageError(wire.PROMPT_TOO_LONG)` if a prompt, negative prompt or prompt of a blend exceeds
    `max_chars`."""
    texts = [(name, getattr(update, name)) for name in ("prompt", "negative_prompt")]
    texts += [(f"prompts[{index}]", text) for index, (text, _) in enumerate(update.prompts or ())]
    for name, text in texts:
        if text is not None and len(text) > max_chars:
            raise MessageError(wire.PROMPT_TOO_LONG, f"`{name}` has {len(text)} characters; the limit is {max_chars}")


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field, e.g. `guidance_scale: Input should be a valid number`."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "message"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def _json_object(text: str | bytes) -> dict:
    """The JSON object in `text`; `MessageError` for anything else, however hostile."""
    try:
        data = json.loads(text)
    except RecursionError as error:  # e.g. "[" * 100000
        raise MessageError(wire.INVALID_JSON, "not valid JSON: nested too deeply") from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise MessageError(wire.INVALID_JSON, f"not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise MessageError(wire.INVALID_MESSAGE, f"a message must be a JSON object, got {type(data).__name__}")
    return data


def _validated(model: type[_Incoming], data: dict, max_prompt_chars: int) -> Any:
    load_time = sorted(LOAD_SETTINGS & set(data))
    if load_time:
        raise MessageError(wire.INVALID_MESSAGE, f"{', '.join(f'`{name}`' for name in load_time)} is a load-time "
                           "setting of the server (a server flag): it is the same for every session and cannot "
                           "change per session")
    try:
        message = model.model_validate(data)
    except ValidationError as error:
        raise MessageError(wire.INVALID_MESSAGE, describe_validation_error(error)) from error
    except RecursionError as error:  # a deeply nested value inside a valid object
        raise MessageError(wire.INVALID_MESSAGE, "a value is nested too deeply") from error
    check_prompt_length(message, max_prompt_chars)
    return message


def parse_client_message(text: str, max_prompt_chars: int) -> ClientMessage:
    """Parse one text message from a client.

    Raises:
        MessageError: `invalid_json`, `unknown_message_type`, `invalid_message` (wrong types, unknown or
            missing fields, non-finite numbers, invalid Unicode) or `prompt_too_long`.
    """
    data = _json_object(text)
    kind = data.get("type")
    model = _CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise MessageError(wire.UNKNOWN_MESSAGE_TYPE,
                            f"unknown message type {kind!r}; expected one of {sorted(_CLIENT_MESSAGES)}")
    return _validated(model, data, max_prompt_chars)


def parse_request_body(body: bytes, model: type[PromptUpdate] | type[_ParamsBase], max_prompt_chars: int) -> Any:
    """Parse a REST request body as `model` (`PromptUpdate` or `ParamsUpdate`), with the WebSocket's rules.

    Raises:
        MessageError: as `parse_client_message`.
    """
    return _validated(model, _json_object(body), max_prompt_chars)
