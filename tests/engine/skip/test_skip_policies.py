"""Skip policies inside the engine: exactness when nothing is skipped, reuse, error, cuts, hooks, caches."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import StreamConfig, StreamEngine
from engine.backends import EagerRunner
from engine.backends.base import RunnerCapabilities
from engine.codec import rgb_to_tensor

SIZE = 32
POLICIES = ("rehash", "adacache")
# Settings under which a policy reuses on every frame it may: guards and schedules out of the way (flat, wire
# names of `StreamConfig.skip`, as a client sends them).
ALWAYS_REUSE = dict(skip_cut_threshold=1e6, skip_accumulated_threshold=1e6, skip_max_age=1000,
                    rehash_interval=1000, adacache_codebook=((1e9, 1000),))


def make_config(**changes) -> StreamConfig:
    """The test stream's config; `changes` by flat parameter names (`skip_cut_threshold`, ...)."""
    base = dict(width=SIZE, height=SIZE, similarity_filter=False, t_index_list=(16, 32, 45))
    base.update(changes)
    return StreamConfig().updated(**base)


def clip(kind: str, count: int = 8, seed: int = 0) -> list[torch.Tensor]:
    return [rgb_to_tensor(frame) for frame in synthetic_clip(kind, count, SIZE, SIZE, seed)]


def run(engine: StreamEngine, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    return [engine(frame) for frame in frames]


def count_rows(modules: list[torch.nn.Module]) -> tuple[list[int], list]:
    """Forward hooks adding up the batch rows each module really computed."""
    counter = [0]

    def hook(module, args, kwargs, output):
        counter[0] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    return counter, [module.register_forward_hook(hook, with_kwargs=True) for module in modules]


def test_off_is_bit_identical_and_leaves_the_shared_unet_untouched(tiny_engine):
    frames = clip("fast_motion")
    reference = run(StreamEngine(tiny_engine, make_config()), frames)
    off = StreamEngine(tiny_engine, make_config(skip_policy="off", skip_cut_threshold=0.5))
    adacache = StreamEngine(tiny_engine, make_config(skip_policy="adacache"))
    assert off.skip_policy is None
    for frame, expected in zip(frames, reference, strict=True):
        adacache(frame)  # interleaved on the same shared UNet
        assert torch.equal(off(frame), expected)
    assert not any("forward" in vars(module) for module in tiny_engine.models.unet.modules())


@pytest.mark.parametrize("cfg_type", ["self", "full"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_policy_that_skips_nothing_equals_off_exactly(tiny_engine, policy, cfg_type):
    never_skip = dict(rehash_interval=1, adacache_codebook=((1e9, 1),), adacache_cross_attention_factor=1)
    frames = clip("slow_pan")
    expected = run(StreamEngine(tiny_engine, make_config(cfg_type=cfg_type)), frames)
    engine = StreamEngine(tiny_engine, make_config(cfg_type=cfg_type, skip_policy=policy, **never_skip))
    for output, reference in zip(run(engine, frames), expected, strict=True):
        assert torch.equal(output, reference)
    assert engine.skip_policy.stats.skip_rate == 0.0


@pytest.mark.parametrize("frame_buffer_size", [1, 2])
@pytest.mark.parametrize("cfg_type", ["self", "initialize", "full"])
@pytest.mark.parametrize("policy", POLICIES)
def test_identical_frames_are_reused_with_zero_error(tiny_engine, policy, cfg_type, frame_buffer_size):
    frames = [torch.stack([frame] * frame_buffer_size) for frame in clip("static", 6)]
    config = make_config(cfg_type=cfg_type, frame_buffer_size=frame_buffer_size)
    expected = run(StreamEngine(tiny_engine, config), frames)
    engine = StreamEngine(tiny_engine, config.replace(skip_policy=policy))
    for output, reference in zip(run(engine, frames), expected, strict=True):
        # Zero up to float rounding: a reused row adds a cached residual back, or was computed in a smaller batch.
        torch.testing.assert_close(output, reference, rtol=0, atol=1e-5)
    assert engine.skip_policy.stats.skip_rate > 0.4


@pytest.mark.parametrize("policy", POLICIES)
def test_error_is_zero_at_zero_change_and_grows_with_the_change(tiny_engine, policy):
    # One slot, so each output depends on its own input only; reuse forced on every frame after the first two.
    config = make_config(t_index_list=(32,))
    scene, other = clip("static", 1)[0], clip("static", 1, seed=7)[0]
    errors = []
    for amount in (0.0, 0.1, 0.3, 1.0):
        changed = (1 - amount) * scene + amount * other
        engine = StreamEngine(tiny_engine, config.updated(skip_policy=policy, **ALWAYS_REUSE))
        run(engine, [scene] * 3)
        output = engine(changed)
        assert not engine.skip_policy.last_full.any()
        reference = StreamEngine(tiny_engine, config)(changed)
        errors.append(float((output - reference).abs().mean()))
    assert errors[0] < 1e-6
    assert errors == sorted(errors) and errors[1] > 10 * max(errors[0], 1e-9)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_hard_cut_is_computed_in_full_at_every_slot_it_passes(tiny_engine, policy):
    # A still scene cut to another still scene: δ is exactly 0 before the cut and large at it, whatever
    # the VAE's latent scale (a random VAE may compress a scene change to δ ≈ 0.03, hence τ_cut = 0.01).
    frames = clip("static", 6, seed=0) + clip("static", 6, seed=5)
    cut = 6
    engine = StreamEngine(tiny_engine, make_config(skip_policy=policy, skip_cut_threshold=0.01, **{
        key: value for key, value in ALWAYS_REUSE.items() if key != "skip_cut_threshold"}))
    decisions, cross = [], []
    for frame in frames:
        engine(frame)
        decisions.append(engine.skip_policy.last_full.tolist())
        cross.append(getattr(engine.skip_policy, "last_cross", engine.skip_policy.last_full).tolist())
    assert decisions[cut - 1] == [False, False, False]  # reuse right before the cut: the test can fail
    for slot in range(3):
        assert decisions[cut + slot][slot], f"slot {slot} reused features of the old scene"
        assert cross[cut + slot][slot], f"slot {slot} reused cross-attention of the old scene"


def test_rehash_skipped_deep_blocks_do_not_run(tiny_engine):
    unet = tiny_engine.models.unet
    engine = StreamEngine(tiny_engine, make_config(skip_policy="rehash", rehash_interval=3))
    frames = clip("static", 9)
    engine(frames[0])  # priming and the first frame compute everything
    deep, deep_hooks = count_rows([unet.mid_block, unet.down_blocks[1]])
    shallow, shallow_hooks = count_rows([unet.down_blocks[0], unet.up_blocks[-1]])
    stats_before = engine.skip_policy.stats.rows_computed
    try:
        run(engine, frames[1:])
    finally:
        for handle in deep_hooks + shallow_hooks:
            handle.remove()
    rows = 3 * 8  # three slot rows per frame, eight frames
    assert shallow[0] == 2 * rows  # head and tail ran on every row
    assert deep[0] == 2 * (engine.skip_policy.stats.rows_computed - stats_before)
    assert deep[0] == 2 * rows // 3  # staggered phases: one slot's deep part per frame


def test_adacache_cached_blocks_do_not_run(tiny_engine):
    unet = tiny_engine.models.unet
    engine = StreamEngine(tiny_engine, make_config(skip_policy="adacache", **ALWAYS_REUSE))
    frames = clip("static", 6)
    run(engine, frames[:2])  # the first compute and the first change measurement
    resnet = unet.mid_block.resnets[0]
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    inner, hooks = count_rows([resnet.conv1, block.attn1.to_q, block.attn2.to_q, block.ff.net[0]])
    head_tail, head_tail_hooks = count_rows([unet.down_blocks[0].resnets[0].conv1, unet.conv_out])
    try:
        run(engine, frames[2:])
    finally:
        for handle in hooks + head_tail_hooks:
            handle.remove()
    assert inner[0] == 0
    assert head_tail[0] == 2 * 3 * 4
    assert engine.skip_policy.stats.skip_rate > 0.5


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("change", [{"prompt": "a new prompt"}, {"seed": 9}, {"t_index_list": (16, 32, 44)},
                                    {"width": SIZE + 8}, {"negative_prompt": "other"}])
def test_caches_clear_on_prompt_seed_step_and_size_changes(tiny_engine, policy, change):
    engine = StreamEngine(tiny_engine, make_config(skip_policy=policy, **ALWAYS_REUSE))
    frames = clip("static", 3, 0)
    run(engine, frames)
    assert not engine.skip_policy.last_full.any()
    engine.update_params(**change)
    policy_object = engine.skip_policy
    assert policy_object.last_full is None and policy_object.guard.reference is None
    engine(frames[0] if "width" not in change else torch.rand(3, SIZE, engine.config.width))
    assert engine.skip_policy.last_full.all()


@pytest.mark.parametrize("policy", POLICIES)
def test_caches_survive_guidance_changes_and_clear_on_reset(tiny_engine, policy):
    engine = StreamEngine(tiny_engine, make_config(skip_policy=policy, **ALWAYS_REUSE))
    run(engine, clip("static", 3))
    engine.update_params(guidance_scale=2.0, skip_cut_threshold=5e5)
    assert engine.skip_policy.settings.cut_threshold == 5e5
    engine(clip("static", 1)[0])
    assert not engine.skip_policy.last_full.any()
    engine.reset()
    engine(clip("static", 1)[0])
    assert engine.skip_policy.last_full.all()


def test_switching_policy_on_a_live_stream(tiny_engine):
    frames = clip("slow_pan", 6)
    engine = StreamEngine(tiny_engine, make_config())
    run(engine, frames[:3])
    engine.update_params(skip_policy="rehash")
    assert engine.skip_policy is not None
    engine.update_params(skip_policy="off")
    assert engine.skip_policy is None


@pytest.mark.parametrize("policy", POLICIES)
def test_two_streams_do_not_share_caches(tiny_engine, policy):
    config = make_config(skip_policy=policy)
    first_frames, second_frames = clip("slow_pan", 8, seed=1), clip("fast_motion", 8, seed=2)
    alone = run(StreamEngine(tiny_engine, config), first_frames)
    first, second = StreamEngine(tiny_engine, config), StreamEngine(tiny_engine, config)
    assert first.skip_policy is not second.skip_policy
    for index, (a, b) in enumerate(zip(first_frames, second_frames, strict=True)):
        second(b)
        assert torch.equal(first(a), alone[index])
    first_caches = getattr(first.skip_policy, "caches", None) or {"deep": first.skip_policy.deep_cache}
    second_caches = getattr(second.skip_policy, "caches", None) or {"deep": second.skip_policy.deep_cache}
    assert all(first_caches[key] is not second_caches[key] for key in first_caches)


class ForeignRunner:  # any runner that is not the eager one (as a compiled backend)
    capabilities = RunnerCapabilities("foreign", dynamic_batch=True)

    def __init__(self, models):
        self.inner = EagerRunner(models)
        self.unet, self.encode, self.decode = self.inner.unet, self.inner.encode, self.inner.decode

    def prepare(self, config, kv_cache):
        pass


def test_a_policy_with_a_non_eager_runner_is_a_clear_error(tiny_models, tiny_engine, with_runner):
    foreign = with_runner(tiny_engine, ForeignRunner(tiny_models))
    with pytest.raises(ValueError, match="needs the eager backend"):
        StreamEngine(foreign, make_config(skip_policy="rehash"))
    engine = StreamEngine(foreign, make_config())
    with pytest.raises(ValueError, match="needs the eager backend"):
        engine.update_params(skip_policy="adacache")
    assert engine.config.skip_policy == "off"


def test_config_rejects_bad_skip_settings():
    with pytest.raises(ValueError, match="skip_policy"):
        StreamConfig(skip_policy="fast")
    with pytest.raises(ValueError, match="stream_batch"):
        StreamConfig(skip_policy="rehash", stream_batch=False)
    with pytest.raises(ValueError, match="adacache_codebook"):
        StreamConfig().updated(adacache_codebook=((0.5, 2), (0.1, 3)))
