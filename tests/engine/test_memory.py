"""Memory modes: `slice` and `group` equal `off` within fp32 tolerance, the slices really happen, the
K/V cache keeps serving cross-attention, and `off` restores diffusers' modules bit for bit."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models
from engine.config import check_compatible
from engine.memory import SliceSettings, apply_memory_mode, memory_mode
from engine.memory.slicing import banded, batch_sliced, chain_geometry
from engine.prompt import CachedKVAttnProcessor

# Small slices so that 64-128 px frames are cut everywhere: batch rows, query and feed-forward tokens,
# VAE bands from 64x64 up and UNet ResNet bands from 8x8 latents up.
SMALL_SLICES = SliceSettings(batch_rows=1, query_rows=48, feed_forward_tokens=40, band_rows=24,
                             spatial_min_pixels=64 * 64, resnet_band_rows=3, resnet_min_pixels=8 * 8)
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    """A private tiny model: memory modes change the shared modules, so other tests never see them."""
    bundle = load_models("tiny")
    yield bundle
    apply_memory_mode(bundle, "off")


def _config(size: int, **changes) -> StreamConfig:
    return StreamConfig(width=size, height=size, t_index_list=(20, 40), similarity_filter=False, **changes)


def _engine(models, memory: str = "off", **load) -> Engine:
    """`models` prepared with memory mode `memory` (a load-time setting: it changes the shared modules)."""
    return Engine.prepare(models, LoadConfig(model=models.name, memory=memory, **{"backend": "eager", **load}))


def _frames(size: int, count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    return [torch.rand(3, size, size, generator=generator) for _ in range(count)]


def _run(models, config: StreamConfig, memory: str = "off", settings: SliceSettings | None = None) -> torch.Tensor:
    engine = StreamEngine(_engine(models, memory), config)
    if settings is not None:
        apply_memory_mode(models, memory, settings)
    return torch.stack([engine(frame) for frame in _frames(config.width)])


@pytest.fixture(scope="module")
def references(models):
    """Memory-off outputs per size, computed once."""
    return {size: _run(models, _config(size)) for size in (64, 96)}


def _record_shapes(module: nn.Module, shapes: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("mode", ["slice", "group"])
def test_mode_equals_off_and_slices(models, references, size, mode):
    """Equal outputs, while inner operators see one batch row, at most `query_rows` queries and
    `feed_forward_tokens` tokens, and (in `group`) the VAE's full-resolution blocks and the UNet's
    ResNets see bands, not images."""
    unet, vae = models.unet, models.vae
    resnet = next(module for module in unet.modules() if isinstance(module, ResnetBlock2D))
    block = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    seen: dict[str, list] = {"resnet": [], "query": [], "ff": [], "decoder": [], "encoder": []}
    observed = {"resnet": resnet.nonlinearity, "query": block.attn1.to_q, "ff": block.ff.net[0],
                "decoder": vae.decoder.layers[-2].fuse, "encoder": vae.encoder.layers[1].fuse}
    handles = [_record_shapes(module, seen[key]) for key, module in observed.items()]
    try:
        output = _run(models, _config(size), mode, SMALL_SLICES)
    finally:
        for handle in handles:
            handle.remove()
    assert memory_mode(models) == mode
    torch.testing.assert_close(output, references[size], rtol=0, atol=ATOL)
    assert {shape[0] for shape in seen["resnet"]} == {1}
    assert max(shape[1] for shape in seen["query"]) <= SMALL_SLICES.query_rows
    assert max(shape[1] for shape in seen["ff"]) <= SMALL_SLICES.feed_forward_tokens
    if mode == "group":
        assert max(shape[-2] for shape in seen["resnet"]) <= SMALL_SLICES.resnet_band_rows + 2  # one halo row each side
        assert seen["decoder"] and max(shape[-2] for shape in seen["decoder"]) <= SMALL_SLICES.band_rows
        assert seen["encoder"] and max(shape[-2] for shape in seen["encoder"]) <= SMALL_SLICES.band_rows


def test_full_vae_batch_slicing_equals_off():
    bundle = load_models("tiny", use_tiny_vae=False)
    config = _config(64, frame_buffer_size=2)
    frames = torch.stack(_frames(64))
    reference = StreamEngine(_engine(bundle, vae="full"), config)(frames)
    output = StreamEngine(_engine(bundle, "group", vae="full"), config)(frames)
    assert bundle.vae.use_slicing
    torch.testing.assert_close(output, reference, rtol=0, atol=ATOL)
    StreamEngine(_engine(bundle, vae="full"), config)
    assert not bundle.vae.use_slicing


def test_group_keeps_the_unet_output_type(models):
    """The whole UNet runs one row at a time in `group`; called with `return_dict=True` it still returns
    diffusers' output object, equal to `off`."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 12, 12, generator=generator)
    text = torch.randn(2, 77, models.unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([700, 300])
    apply_memory_mode(models, "off")
    with torch.no_grad():
        reference = models.unet(latents, timesteps, encoder_hidden_states=text).sample
        apply_memory_mode(models, "group", SMALL_SLICES)
        output = models.unet(latents, timesteps, encoder_hidden_states=text)
    apply_memory_mode(models, "off")
    assert type(output).__name__ == "UNet2DConditionOutput"
    torch.testing.assert_close(output.sample, reference, rtol=0, atol=ATOL)


def test_off_is_untouched(models):
    reference = _run(models, _config(64))  # memory off: the K/V processors the engine always installs
    classes = {name: type(module) for name, module in (*models.unet.named_modules(), *models.vae.named_modules())}
    processors = dict(models.unet.attn_processors)
    _run(models, _config(64), "group", SMALL_SLICES)
    apply_memory_mode(models, "slice")
    output = _run(models, _config(64))
    assert memory_mode(models) == "off"
    assert torch.equal(output, reference)
    assert {name: type(module) for name, module in (*models.unet.named_modules(),
                                                    *models.vae.named_modules())} == classes
    assert all(models.unet.attn_processors[name] is processor for name, processor in processors.items())
    assert not models.vae.use_slicing


def test_apply_is_idempotent(models):
    apply_memory_mode(models, "group", SMALL_SLICES)
    block = models.unet.down_blocks[0]
    wrapped_class = type(block)
    apply_memory_mode(models, "group", SMALL_SLICES)
    assert type(block) is wrapped_class
    apply_memory_mode(models, "slice", SMALL_SLICES)
    apply_memory_mode(models, "slice", SMALL_SLICES)
    resnet = next(module for module in models.unet.modules() if isinstance(module, ResnetBlock2D))
    assert len([cls for cls in type(resnet).__mro__ if cls.__name__ == "BatchSliced"]) == 1
    apply_memory_mode(models, "off")


def test_kv_cache_serves_cross_attention(models):
    """With slicing on, cross-attention still takes K/V from the per-prompt cache: to_k never runs."""
    engine = StreamEngine(_engine(models, "slice"), _config(64))
    apply_memory_mode(models, "slice", SMALL_SLICES)
    cross = [module for name, module in models.unet.named_modules() if name.endswith("attn2")]
    assert all(isinstance(module.processor, CachedKVAttnProcessor) for module in cross)
    calls = []
    handles = [module.to_k.register_forward_hook(lambda *_: calls.append(1)) for module in cross]
    try:
        engine(_frames(64)[0])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    apply_memory_mode(models, "off")


def test_slice_composes_with_a_skip_policy(models):
    config = _config(64, skip_policy="rehash")
    reference = _run(models, config)
    output = _run(models, config, "slice", SMALL_SLICES)
    torch.testing.assert_close(output, reference, rtol=0, atol=ATOL)
    apply_memory_mode(models, "off")


def test_config_validation(models):
    with pytest.raises(ValueError, match="`memory`"):
        LoadConfig(memory="tiles")
    with pytest.raises(ValueError, match="eager"):
        LoadConfig(memory="slice", backend="onnxruntime")
    # `memory` is a load-time setting and `skip_policy` a stream's: a stream asking for a skip policy on an
    # engine loaded with `group` is refused, when it opens and when it switches one on.
    with pytest.raises(ValueError, match="skip_policy"):
        check_compatible(LoadConfig(memory="group"), StreamConfig(skip_policy="rehash"))
    check_compatible(LoadConfig(memory="slice"), StreamConfig(skip_policy="rehash"))
    grouped = _engine(models, "group")
    try:
        with pytest.raises(ValueError, match="skip_policy"):
            StreamEngine(grouped, _config(64, skip_policy="rehash"))
        stream = StreamEngine(grouped, _config(64))
        with pytest.raises(ValueError, match="skip_policy"):
            stream.update_params(skip_policy="adacache")
        assert stream.config.skip_policy == "off"
    finally:
        apply_memory_mode(models, "off")
    with pytest.raises(ValueError, match="`batch_rows`"):
        SliceSettings(batch_rows=0)


@pytest.mark.parametrize("height", [37, 64])
def test_banded_chain_equals_whole(height):
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 5, padding=2), nn.Conv2d(4, 2, 3, stride=2, padding=1),
    )
    geometry = chain_geometry(chain)
    assert geometry.align == 2 and geometry.scale == 0.5
    x = torch.randn(2, 3, height, 20)
    with torch.no_grad():
        whole = chain(x)
        for band_rows in (4, 8, 12):
            torch.testing.assert_close(banded(chain, x, geometry, band_rows), whole, rtol=0, atol=1e-6)


def test_banding_refuses_image_wide_normalisation():
    with pytest.raises(ValueError, match="GroupNorm"):
        chain_geometry(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)))


def test_batch_sliced_cuts_nested_arguments():
    rows = 5
    kv = {"layer": (torch.randn(rows, 2, 3, 4), torch.randn(rows, 2, 3, 4))}

    def call(x, scale, kwargs):
        key, value = kwargs["kv_cache"]["layer"]
        assert x.shape[0] == key.shape[0] == value.shape[0] <= 2
        return x * scale + key.sum(dim=(1, 2, 3))[:, None], (x - value.sum(dim=(1, 2, 3))[:, None],)

    x = torch.randn(rows, 3)
    sliced = batch_sliced(call, rows, 2, (x, 2.0, {"kv_cache": kv}), {})
    key, value = kv["layer"]
    torch.testing.assert_close(sliced[0], x * 2.0 + key.sum(dim=(1, 2, 3))[:, None])
    torch.testing.assert_close(sliced[1][0], x - value.sum(dim=(1, 2, 3))[:, None])
