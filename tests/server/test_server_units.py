"""Pure pieces of the server: settings, message parsing, health decisions, output statistics, auth."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from engine.config import HOT_PARAMS, LoadConfig, RuntimeOptions, StreamConfig, live_params
from server.auth import token_matches, websocket_credentials
from server.health import DEGRADED, ERROR, LOADING, READY, assess_health
from server.protocol import (
    UPDATABLE_PARAMS,
    MessageError,
    ParamsMessage,
    PromptMessage,
    parse_client_message,
)
from server.sessions import OutputWindow
from server.settings import env_name, parse_settings
from wire import blend_message, close_reason, prompt_message

# ---------------------------------------------------------------- settings


def test_defaults_come_from_engine_config():
    settings = parse_settings([], environ={})
    assert (settings.load, settings.stream, settings.runtime) == (LoadConfig(), StreamConfig(), RuntimeOptions())
    # A user who names no model gets the trained demo stylizer (`tiny` is the random test model).
    assert (settings.host, settings.port, settings.load.model) == ("127.0.0.1", 8000, "demo")
    assert settings.token is None and settings.cors_origins == ()


def test_flags_win_over_environment():
    environ = {"STREAMDIFF_PORT": "9001", "STREAMDIFF_MAX_MESSAGE_SIZE": "1000", "STREAMDIFF_MODEL": "small",
               "STREAMDIFF_TOKEN": "from-env",
               "STREAMDIFF_SIMILARITY_FILTER": "false", "STREAMDIFF_T_INDEX_LIST": "10,20,30"}
    settings = parse_settings(["--port", "9002", "--cfg-type", "full", "--width", "128", "--max-sessions", "7",
                               "--vae", "full", "--model-config", "/models/sd15"], environ=environ)
    assert settings.load.vae == "full" and settings.load.model_config == "/models/sd15"
    assert settings.port == 9002 and settings.max_sessions == 7 and settings.token == "from-env"
    assert settings.max_message_bytes == 1000
    assert settings.load.model == "small" and settings.stream.cfg_type == "full"
    assert settings.stream.width == 128 and settings.stream.height == StreamConfig().height
    assert settings.stream.t_index_list == (10, 20, 30) and settings.stream.similarity_filter is False


def test_vae_backend_flag_and_environment():
    assert parse_settings([], environ={}).load.vae_backend is None
    assert parse_settings(["--vae-backend", "onnxruntime"], environ={}).load.vae_backend == "onnxruntime"
    assert parse_settings([], environ={"STREAMDIFF_VAE_BACKEND": "eager"}).load.vae_backend == "eager"
    with pytest.raises(SystemExit):
        parse_settings(["--vae-backend", "gpu"], environ={})


def test_skip_policy_and_memory_mode_flags():
    settings = parse_settings(["--skip-policy", "rehash", "--memory", "slice"], environ={})
    assert (settings.stream.skip_policy, settings.load.memory) == ("rehash", "slice")
    settings = parse_settings([], environ={"STREAMDIFF_SKIP_POLICY": "adacache"})
    assert settings.stream.skip_policy == "adacache" and settings.load.memory == "off"


def test_lora_flag_repeats_and_its_variable_lists_several():
    assert parse_settings([], environ={}).load.loras == ()
    settings = parse_settings(["--lora", "a/b", "--lora", "./c.safetensors:0.5"], environ={"STREAMDIFF_LORA": "x/y"})
    assert [str(spec) for spec in settings.load.loras] == ["a/b:1", "./c.safetensors:0.5"]
    settings = parse_settings([], environ={"STREAMDIFF_LORA": "latent-consistency/lcm-lora-sdv1-5; ./style:0.8"})
    assert [str(spec) for spec in settings.load.loras] == ["latent-consistency/lcm-lora-sdv1-5:1", "./style:0.8"]


@pytest.mark.parametrize(("argv", "environ"), [
    (["--width", "65"], {}),
    ([], {"STREAMDIFF_LORA": "style:nan"}),
    (["--skip-policy", "sometimes"], {}),
    ([], {"STREAMDIFF_MEMORY": "tiles"}),
    (["--cfg-type", "sometimes"], {}),
    ([], {"STREAMDIFF_PORT": "eighty"}),
    ([], {"STREAMDIFF_BACKEND": "quantum"}),
    ([], {"STREAMDIFF_MAX_SESSIONS": "0"}),
    (["--t-index-list", "45,10"], {}),
    (["--vae", "medium"], {}),
    ([], {"STREAMDIFF_JPEG_QUALITY": "0"}),
])
def test_invalid_settings_exit_with_a_message(argv, environ, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, environ=environ)
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_every_flag_has_an_environment_variable():
    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    for flag in ("--host", "--port", "--model", "--width", "--height", "--t-index-list", "--cfg-type", "--backend",
                 "--max-sessions", "--token", "--max-message-size", "--max-in-flight", "--log-level"):
        assert flag in help_text and env_name(flag) in help_text


# ---------------------------------------------------------------- protocol


def test_every_updatable_param_round_trips_its_engine_default_through_json():
    assert UPDATABLE_PARAMS == HOT_PARAMS | {"t_index_list"} == live_params() - {"width", "height"}
    defaults = StreamConfig().flat_params()
    for name in UPDATABLE_PARAMS:
        text = json.dumps({"type": "params", name: defaults[name]})
        assert parse_client_message(text, 10_000).engine_params() == {name: defaults[name]}, name


def test_parse_prompt_and_params_messages():
    prompt = parse_client_message('{"type": "prompt", "prompt": "a fox", "negative_prompt": "blur"}', 100)
    assert isinstance(prompt, PromptMessage)
    assert prompt.engine_params() == {"prompt": "a fox", "negative_prompt": "blur"}
    params = parse_client_message('{"type": "params", "guidance_scale": 2, "t_index_list": [20, 40]}', 100)
    assert isinstance(params, ParamsMessage)
    assert params.engine_params() == {"guidance_scale": 2.0, "t_index_list": (20, 40)}


def test_parse_prompt_blends_seed_blends_and_transitions():
    blend = parse_client_message(blend_message([("a fox", 0.7), ("watercolor", 0.3)], negative_prompt="blur"), 100)
    assert isinstance(blend, PromptMessage)
    assert blend.engine_params() == {"prompts": (("a fox", 0.7), ("watercolor", 0.3)), "negative_prompt": "blur"}
    # A plain prompt stays valid and names only itself; integer weights are numbers too.
    assert parse_client_message(prompt_message("a fox"), 100).engine_params() == {"prompt": "a fox"}
    assert parse_client_message('{"type": "prompt", "prompts": [["a", 1], ["b", 3]]}', 100).engine_params() == \
        {"prompts": (("a", 1.0), ("b", 3.0))}
    params = parse_client_message(json.dumps({
        "type": "params", "seeds": [[2, 0.5], [7, 0.5]], "prompt_blend": "slerp", "prompt_transition_frames": 12,
        "seed_transition_frames": 6}), 100)
    assert params.engine_params() == {"seeds": ((2, 0.5), (7, 0.5)), "prompt_blend": "slerp",
                                      "prompt_transition_frames": 12, "seed_transition_frames": 6}


@pytest.mark.parametrize(("text", "code"), [
    ("", "invalid_json"),
    ("null", "invalid_message"),
    ('{"type": 3}', "unknown_message_type"),
    ('{"type": "params", "delta": true}', "invalid_message"),
    ('{"type": "prompt", "prompt": "abcdef"}', "prompt_too_long"),
    ('{"type": "prompt", "prompts": [["ok", 1], ["abcdef", 1]]}', "prompt_too_long"),
    ('{"type": "prompt", "negative_prompt": "x"}', "invalid_message"),
    ('{"type": "prompt", "prompts": [["a", "heavy"]]}', "invalid_message"),
    ('{"type": "prompt", "prompts": [["a", 1, 2]]}', "invalid_message"),
    ('{"type": "prompt", "prompts": [[3, 1]]}', "invalid_message"),
    ('{"type": "prompt", "prompts": [["a", NaN]]}', "invalid_message"),
    ('{"type": "params", "seeds": [[1.5, 1]]}', "invalid_message"),
    ('{"type": "params", "prompt_blend": "cubic"}', "invalid_message"),
    (json.dumps({"type": "prompt", "prompts": [["a", 1]] * 65}), "invalid_message"),
])
def test_parse_errors_have_stable_codes(text, code):
    with pytest.raises(MessageError) as raised:
        parse_client_message(text, max_prompt_chars=5)
    assert raised.value.code == code and raised.value.message


def test_close_reason_fits_a_control_frame():
    assert close_reason("short") == "short"
    cut = close_reason("é" * 200)
    assert len(cut.encode()) <= 123 and cut.endswith("...")


# ---------------------------------------------------------------- health and statistics


@pytest.mark.parametrize(("loaded", "load_error", "since_error", "latency", "expected"), [
    (False, None, None, None, LOADING),
    (False, "boom", None, None, ERROR),
    (True, None, None, None, READY),
    (True, None, 5.0, 0.1, DEGRADED),
    (True, None, 60.0, 0.1, READY),
    (True, None, None, 12.0, DEGRADED),
    (True, None, None, 9.0, READY),
])
def test_assess_health(loaded, load_error, since_error, latency, expected):
    assert assess_health(loaded, load_error, since_error, latency, error_window_s=30.0, max_latency_s=10.0) == expected


def test_a_handle_says_how_long_its_oldest_unanswered_frame_has_waited(tiny_engine):
    """How far a stream is behind is the runtime's fact (the server used to rebuild it from its own marks)."""
    from engine.handle import FrameResult
    from engine.runtime import StreamRuntime

    with StreamRuntime(tiny_engine, StreamConfig(width=32, height=32, similarity_filter=False)) as runtime:
        handle = runtime.open_stream(max_in_flight=4)
        assert handle.behind_s(100.0) == 0.0
        handle._schedule.acquire()  # hold the runtime's threads off the frames
        try:
            handle.put(b"not an image", arrival=10.0)
            handle.put(b"not an image either", arrival=12.0)
            assert handle.behind_s(15.0) == 5.0  # the oldest waits since 10.0
            now = time.monotonic()
            assert runtime.status().behind_s >= handle.behind_s(now) > 0
        finally:
            handle._schedule.release()
        answers = [handle.get(timeout=30) for _ in range(2)]
        assert all(isinstance(answer, FrameResult) for answer in answers)
        assert handle.behind_s(100.0) == 0.0  # answered: nothing waits


def test_output_window_fps_and_latency_over_recent_frames():
    window = OutputWindow(size=3)
    assert window.fps == 0.0 and window.latency_s is None
    for index in range(5):
        window.record(sent_at=index * 0.5, latency_s=0.1 * (index + 1), inference_s=0.05)
    assert window.fps == pytest.approx(2.0)
    assert window.latency_s == pytest.approx(0.4)
    assert len(window.sent_at) == 3


# ---------------------------------------------------------------- auth


def test_websocket_credentials_from_query_or_subprotocol():
    assert websocket_credentials("abc", []) == ("abc", None)
    assert websocket_credentials(None, ["bearer.xyz"]) == ("xyz", "bearer.xyz")
    assert websocket_credentials(None, ["streamdiff", "bearer.xyz"]) == ("xyz", "streamdiff")
    assert websocket_credentials(None, ["other"]) == (None, None)
    assert token_matches(None, None) and token_matches("t", "t")
    assert not token_matches("t", None) and not token_matches("t", "u")


def test_a_load_time_setting_in_a_message_is_named_as_such():
    with pytest.raises(MessageError) as raised:
        parse_client_message('{"type": "params", "backend": "onnxruntime"}', 100)
    assert raised.value.code == "invalid_message" and "`backend` is a load-time setting" in raised.value.message


@pytest.mark.slow
def test_one_flag_vocabulary_for_server_and_build():
    """The server and `python -m engine.build` spell the engine's flags the same way (`engine.flags`)."""
    server_help = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True,
                                 timeout=120, check=True).stdout
    build_help = subprocess.run([sys.executable, "-m", "engine.build", "--help"], capture_output=True, text=True,
                                timeout=120, check=True).stdout
    for flag in ("--model", "--vae", "--width", "--height", "--t-index-list", "--cfg-type", "--backend", "--dtype",
                 "--no-kv-cache"):
        assert flag in server_help and flag in build_help, flag
    assert "--tiny-vae" not in server_help


def test_the_engine_and_the_wire_share_one_frame_error_vocabulary():
    """The engine writes each frame error's code; `wire` is what clients read them by (it imports no engine)."""
    import wire
    from engine import codec

    assert codec.FRAME_ERROR_CODES == wire.FRAME_ERROR_CODES
    assert {getattr(codec, name) for name in ("EMPTY_FRAME", "UNSUPPORTED_FORMAT", "BAD_IMAGE", "IMAGE_TOO_LARGE",
                                              "INFERENCE_FAILED")} == codec.FRAME_ERROR_CODES


@pytest.mark.parametrize(("params", "needle"), [
    ({"skip_accumulated_threshold": None}, "`skip_accumulated_threshold` must be a number"),
    ({"guidance_scale": True}, "`guidance_scale` must be a number"),
    ({"t_index_list": [1, "2"]}, "`t_index_list` must be a list of an integer"),
    ({"cfg_type": "nope"}, "`cfg_type` must be one of 'none', 'self', 'initialize', 'full'"),
    ({"prompts": [["a fox", "heavy"]]}, "`prompts` must be a list of [a string, a number]"),
])
def test_a_parameter_of_the_wrong_type_is_a_value_error_naming_it(params, needle):
    """The engine's own check (found by the fuzz tests): a wrong type raised TypeError deep in a constructor."""
    with pytest.raises(ValueError) as refused:
        StreamConfig().updated(**params)
    assert needle in str(refused.value)
    assert StreamConfig().updated(guidance_scale=2, t_index_list=[10, 30]).guidance_scale == 2  # JSON's shapes pass
