"""The built-in models: seeded, randomly initialised sets of the real classes, built offline.

`tiny` (about a million UNet parameters) builds in well under a second and is what tests and the
offline demo run; `small` (tens of millions of UNet parameters) is compute-bound for benchmarks;
`sd-turbo-random` and `sdxl-turbo-random` are the real architectures at full size (a GPU's real-size proof);
`tiny-sdxl` is `tiny`'s size in SDXL's architecture: two text encoders (the second with a projection)
whose penultimate hidden states are concatenated, and a UNet with SDXL's added text/time conditioning
(`addition_embed_type="text_time"`, as diffusers' own SDXL tests build it).
All are identical on every call and machine for a given seed: a fixed seed and a fixed
construction order, and tokenizers built from an in-memory byte vocabulary (no files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: The real architectures at full size with seeded random weights: a real model's compute and memory with no
#: download (`benchmarks.gpu_proof`). Their parameter counts are the real ones (tests/engine/test_models.py).
REAL_SIZE_MODELS: tuple[str, ...] = ("sd-turbo-random", "sdxl-turbo-random")
BUILTIN_MODELS: tuple[str, ...] = ("tiny", "small", "tiny-sdxl", *REAL_SIZE_MODELS)
#: CLIP's vocabulary: the real text encoders' embedding tables (the byte-level tokenizer uses its first 514 ids).
_CLIP_VOCAB = 49408
#: SDXL's time ids are six numbers (original size, crop corner, target size), each embedded in this many dims.
_SDXL_TIME_IDS = 6
#: The real SDXL VAE's latent scaling (SD 1.x/2.x: 0.18215).
_SDXL_VAE_SCALING = 0.13025


@dataclass(frozen=True)
class _Preset:
    text_hidden: int
    text_layers: int
    unet_channels: tuple[int, ...]
    unet_down: tuple[str, ...]
    unet_up: tuple[str, ...]
    attention_head_dim: int
    taesd_channels: int
    taesd_blocks: tuple[int, ...]
    #: SDXL's added conditioning: the dims of each time id's embedding; 0 for the SD family.
    addition_time_embed_dim: int = 0
    #: SDXL's second text encoder's width (and pooled projection); wider than the first, as in SDXL (1280 vs 768),
    #: so nothing that tells them apart by width (diffusers' single-file loader does) can mix them up.
    text_hidden_2: int = 0


_PRESETS: dict[str, _Preset] = {
    # About a million UNet parameters: fast tests and the offline default.
    "tiny": _Preset(32, 2, (32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"),
                    ("CrossAttnUpBlock2D", "UpBlock2D"), 8, 16, (1, 1, 1, 1)),
    # Tens of millions of UNet parameters: compute-bound benchmarks.
    "small": _Preset(128, 4, (128, 256, 256), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), 32, 32, (1, 2, 2, 2)),
    # `tiny` in SDXL's architecture: text encoders 32 and 48 wide, so the UNet cross-attends to 80-wide states.
    "tiny-sdxl": _Preset(32, 2, (32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"),
                         ("CrossAttnUpBlock2D", "UpBlock2D"), 8, 16, (1, 1, 1, 1), addition_time_embed_dim=8,
                         text_hidden_2=48),
}


@dataclass
class BuiltinModules:
    """The modules of one built-in model, before they are wrapped in a `ModelBundle`."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    tiny_vae: AutoencoderTiny
    full_vae: AutoencoderKL
    scheduler: LCMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None


def build_byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte symbols (no merges), built in memory with no files."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _signal_preserving_init(vae: AutoencoderTiny) -> None:
    """Re-draw the tiny VAE's conv weights (He init) so a random VAE still carries the picture.

    PyTorch's default conv init shrinks the signal at every layer: through TAESD's deep, norm-free
    stacks the random decoder's output is a near-black constant whatever the input (±0.1/255), which
    makes every output comparison meaningless. He init keeps the variance; the two output convs are
    scaled so latents have about unit spread and decoded images sit around mid-grey.
    """
    convs = [module for module in vae.modules() if isinstance(module, torch.nn.Conv2d)]
    encoder_out, decoder_out = vae.encoder.layers[-1], vae.decoder.layers[-1]
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
        gain = {id(encoder_out): 0.1, id(decoder_out): 0.0005}.get(id(conv), 2.0)
        with torch.no_grad():
            conv.weight.normal_(0.0, math.sqrt(gain / fan_in))
            if conv.bias is not None:
                conv.bias.fill_(0.5 if conv is decoder_out else 0.0)


@dataclass(frozen=True)
class _RealSize:
    """A real model's architecture: its UNet's diffusers config and its text encoders' (width, layers, heads,
    activation, projection) as CLIP configs."""

    unet: dict
    text: tuple[tuple[int, int, int, str, int], ...]
    vae_scaling: float


_REAL_SIZE: dict[str, _RealSize] = {
    # stabilityai/sd-turbo: the SD 2.1 UNet (865.9 M parameters) at 512², OpenCLIP-H's text tower as CLIPTextModel.
    "sd-turbo-random": _RealSize(
        unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
        text=((1024, 23, 16, "gelu", 512),), vae_scaling=0.18215),
    # stabilityai/sdxl-turbo: the SDXL UNet (2.57 B parameters) at 512², CLIP-L and OpenCLIP-bigG (projected).
    "sdxl-turbo-random": _RealSize(
        unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, use_linear_projection=True),
        text=((768, 12, 12, "quick_gelu", 768), (1280, 32, 20, "gelu", 1280)), vae_scaling=_SDXL_VAE_SCALING),
}


def _build_real_size(name: str, seed: int) -> BuiltinModules:
    """The modules of real-size model `name`, on torch's current default device (build them under
    `with torch.device("cuda")` to skip the CPU copy, or `"meta"` to count parameters)."""
    real = _REAL_SIZE[name]
    tokenizer = build_byte_level_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def text_config(width: int, layers: int, heads: int, activation: str, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=_CLIP_VOCAB, hidden_size=width, intermediate_size=width * 4,
                              num_hidden_layers=layers, num_attention_heads=heads, hidden_act=activation,
                              max_position_embeddings=77, projection_dim=projection,
                              bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(text_config(*real.text[0]))
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **real.unet)
        tiny_vae = AutoencoderTiny()  # TAESD's (and TAESDXL's) architecture is the class's default
        _signal_preserving_init(tiny_vae)
        full_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                 norm_num_groups=32, scaling_factor=real.vae_scaling)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(*real.text[1])) if len(real.text) > 1 else None
    finally:
        torch.random.set_rng_state(generator_state)
    return BuiltinModules(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, tiny_vae=tiny_vae,
                          full_vae=full_vae, scheduler=LCMScheduler(),
                          tokenizer_2=build_byte_level_tokenizer() if text_encoder_2 is not None else None,
                          text_encoder_2=text_encoder_2)


def build_modules(name: str, seed: int = 0) -> BuiltinModules:
    """Build the seeded modules of built-in model `name` (a key of `BUILTIN_MODELS`)."""
    if name in _REAL_SIZE:
        return _build_real_size(name, seed)
    preset = _PRESETS[name]
    sdxl = preset.addition_time_embed_dim > 0
    tokenizer = build_byte_level_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def text_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 4,
            num_hidden_layers=preset.text_layers, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=width, bos_token_id=vocab_size - 2, eos_token_id=eos, pad_token_id=eos,
        )

    # SDXL's UNet reads both encoders' hidden states side by side, and the pooled one with the time ids.
    cross_attention_dim = preset.text_hidden + preset.text_hidden_2
    sdxl_unet = {} if not sdxl else {
        "addition_embed_type": "text_time", "addition_time_embed_dim": preset.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": _SDXL_TIME_IDS * preset.addition_time_embed_dim + preset.text_hidden_2,
        "use_linear_projection": True,
    }
    # A fixed seed and a fixed construction order make the weights identical on every machine; the
    # caller's global RNG state is restored so building a model never perturbs anyone's randomness.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(text_config(preset.text_hidden))
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=preset.unet_channels, down_block_types=preset.unet_down,
            up_block_types=preset.unet_up, cross_attention_dim=cross_attention_dim,
            attention_head_dim=preset.attention_head_dim, norm_num_groups=32, **sdxl_unet,
        )
        channels = (preset.taesd_channels,) * 4
        tiny_vae = AutoencoderTiny(
            encoder_block_out_channels=channels, decoder_block_out_channels=channels,
            num_encoder_blocks=preset.taesd_blocks, num_decoder_blocks=preset.taesd_blocks,
        )
        _signal_preserving_init(tiny_vae)
        full_vae = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
            **({"scaling_factor": _SDXL_VAE_SCALING} if sdxl else {}),
        )
        # Built last, so the SD-family built-ins keep the weights they always had.
        text_encoder_2 = CLIPTextModelWithProjection(text_config(preset.text_hidden_2)) if sdxl else None
    finally:
        torch.random.set_rng_state(generator_state)
    return BuiltinModules(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, tiny_vae=tiny_vae,
                          full_vae=full_vae, scheduler=LCMScheduler(),
                          tokenizer_2=build_byte_level_tokenizer() if sdxl else None, text_encoder_2=text_encoder_2)
