"""Model loading: one `ModelBundle` from a hub id, a local diffusers folder, a single file, or a
built-in seeded random model of the real architecture (`tiny`, `small`)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

BUILTIN_MODELS: tuple[str, ...] = ("tiny", "small")
DEFAULT_HUB_MODEL = "stabilityai/sd-turbo"
DEFAULT_TAESD = "madebyollin/taesd"
# Our convention for a TAESD shipped inside a saved model folder (real hub models keep it apart).
TINY_VAE_SUBFOLDER = "vae_tiny"


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message says what was tried and what to do."""


@dataclass
class ModelBundle:
    """The shared, read-only model set that every stream of one engine configuration uses."""

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderTiny | AutoencoderKL
    scheduler: LCMScheduler
    full_vae: AutoencoderKL | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side."""
        return 8

    def to(self, device: torch.device, dtype: torch.dtype) -> "ModelBundle":
        """Move every module to `device`/`dtype` in place and put it in eval mode."""
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Save as a diffusers folder (with the tiny VAE in `vae_tiny/`) loadable by `load_models`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        full_vae = self.full_vae if self.full_vae is not None else self.vae
        if isinstance(full_vae, AutoencoderKL):
            full_vae.save_pretrained(folder / "vae")
        if isinstance(self.vae, AutoencoderTiny):
            self.vae.save_pretrained(folder / TINY_VAE_SUBFOLDER)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "LCMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------- built-in models


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


_PRESETS: dict[str, _Preset] = {
    # About a million UNet parameters: fast tests and the offline default.
    "tiny": _Preset(32, 2, (32, 64), ("DownBlock2D", "CrossAttnDownBlock2D"),
                    ("CrossAttnUpBlock2D", "UpBlock2D"), 8, 16, (1, 1, 1, 1)),
    # Tens of millions of UNet parameters: compute-bound benchmarks.
    "small": _Preset(128, 4, (128, 256, 256), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), 32, 32, (1, 2, 2, 2)),
}


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


def build_builtin(name: str, seed: int = 0) -> ModelBundle:
    """Build the seeded, randomly initialised `tiny` or `small` model of the real classes."""
    if name not in _PRESETS:
        raise ModelLoadError(f"unknown built-in model {name!r}; built-ins are {BUILTIN_MODELS}")
    preset = _PRESETS[name]
    tokenizer = build_byte_level_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # A fixed seed and a fixed construction order make the weights identical on every machine.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=preset.text_hidden, intermediate_size=preset.text_hidden * 4,
            num_hidden_layers=preset.text_layers, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=preset.text_hidden, bos_token_id=vocab_size - 2, eos_token_id=eos, pad_token_id=eos,
        ))
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=preset.unet_channels, down_block_types=preset.unet_down,
            up_block_types=preset.unet_up, cross_attention_dim=preset.text_hidden,
            attention_head_dim=preset.attention_head_dim, norm_num_groups=32,
        )
        channels = (preset.taesd_channels,) * 4
        vae = AutoencoderTiny(
            encoder_block_out_channels=channels, decoder_block_out_channels=channels,
            num_encoder_blocks=preset.taesd_blocks, num_decoder_blocks=preset.taesd_blocks,
        )
        full_vae = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return ModelBundle(name=name, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                       scheduler=LCMScheduler(), full_vae=full_vae)


# --------------------------------------------------------------------------- loaders


def _is_single_file(spec: str) -> bool:
    return spec.endswith((".safetensors", ".ckpt"))


def _load_tiny_vae(source: str, local_only: bool) -> AutoencoderTiny:
    try:
        return AutoencoderTiny.from_pretrained(source, local_files_only=local_only)
    except Exception as error:  # diffusers raises OSError, ValueError or hub errors here
        raise ModelLoadError(
            f"could not load the tiny VAE (TAESD) from {source!r}: {error}. "
            "Pass `--taesd PATH` to a local AutoencoderTiny folder, or use the model's full VAE (`--vae full`)."
        ) from error


def _load_folder(folder: Path, use_tiny_vae: bool, taesd: str | None, name: str) -> ModelBundle:
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise ModelLoadError(
            f"{str(folder)!r} is not a diffusers folder (no model_index.json or unet/). "
            "Pass a folder saved with `save_pretrained`, a hub id, a `.safetensors` file, or `tiny`."
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        scheduler = LCMScheduler.from_config(LCMScheduler.load_config(folder / "scheduler"))
        full_vae = AutoencoderKL.from_pretrained(folder / "vae") if (folder / "vae").is_dir() else None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the diffusers folder {str(folder)!r}: {error}") from error
    return _assemble(name, tokenizer, text_encoder, unet, scheduler, full_vae, use_tiny_vae, taesd, folder)


def _assemble(name, tokenizer, text_encoder, unet, scheduler, full_vae, use_tiny_vae, taesd, folder=None):
    if use_tiny_vae:
        if taesd is not None:
            vae = _load_tiny_vae(taesd, local_only=Path(taesd).exists())
        elif folder is not None and (folder / TINY_VAE_SUBFOLDER).is_dir():
            vae = _load_tiny_vae(str(folder / TINY_VAE_SUBFOLDER), local_only=True)
        else:
            logger.info("loading the tiny VAE from %s", DEFAULT_TAESD)
            vae = _load_tiny_vae(DEFAULT_TAESD, local_only=False)
    elif full_vae is None:
        raise ModelLoadError(f"model {name!r} has no full VAE (no vae/ folder); use the tiny VAE instead")
    else:
        vae = full_vae
    return ModelBundle(name=name, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                       scheduler=scheduler, full_vae=full_vae)


def _load_hub(repo_id: str, use_tiny_vae: bool, taesd: str | None) -> ModelBundle:
    from huggingface_hub import snapshot_download

    logger.info("fetching %s from the model hub (or its local cache)", repo_id)
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "tokenizer/*", "text_encoder/*", "unet/*", "vae/*", "scheduler/*"],
            ignore_patterns=["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*fp16*", "*.non_ema.*"],
        )
    except Exception as error:  # offline, unknown repo, gated repo, ...
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the model hub: {error}. "
            "The hub may be unreachable: pass a local diffusers folder, a `.safetensors` file, or `tiny`."
        ) from error
    return _load_folder(Path(folder), use_tiny_vae, taesd, name=repo_id)


def _load_single_file(path: Path, use_tiny_vae: bool, taesd: str | None, config: str | None) -> ModelBundle:
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config, local_files_only=config is not None and Path(config).exists(),
            safety_checker=None, requires_safety_checker=False,
        )
    except Exception as error:
        raise ModelLoadError(
            f"could not load the single-file checkpoint {str(path)!r}: {error}. "
            "Single files need their architecture's config: pass `config=` a local diffusers folder "
            "of the same architecture (or a reachable hub id)."
        ) from error
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return _assemble(path.name, pipe.tokenizer, pipe.text_encoder, pipe.unet, scheduler, pipe.vae,
                     use_tiny_vae, taesd)


def load_models(
    spec: str = "tiny",
    *,
    use_tiny_vae: bool = True,
    taesd: str | None = None,
    config: str | None = None,
    seed: int = 0,
) -> ModelBundle:
    """Load a model set from `spec`.

    Args:
        spec (`str`): `tiny` or `small` (built-in seeded random models), a local diffusers folder, a
            single `.safetensors`/`.ckpt` checkpoint, or a hub id such as `stabilityai/sd-turbo`.
        use_tiny_vae (`bool`): use `AutoencoderTiny` (TAESD); else the model's own `AutoencoderKL`.
        taesd (`str | None`): hub id or folder of a TAESD; by default a folder's `vae_tiny/`, else
            `madebyollin/taesd`.
        config (`str | None`): for single files, a diffusers folder or hub id of the same architecture.
        seed (`int`): seed of the built-in models' weights.

    Raises:
        ModelLoadError: naming what was tried and what to do instead.
    """
    logger.info("loading model %r", spec)
    if spec in BUILTIN_MODELS:
        bundle = build_builtin(spec, seed=seed)
        if not use_tiny_vae:
            bundle.vae = bundle.full_vae
        return bundle
    path = Path(spec).expanduser()
    if _is_single_file(spec):
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {spec!r} does not exist")
        return _load_single_file(path, use_tiny_vae, taesd, config)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{spec!r} is a file but not a `.safetensors`/`.ckpt` checkpoint")
        return _load_folder(path, use_tiny_vae, taesd, name=str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model {spec!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), an existing path, "
            "nor a hub id of the form owner/name"
        )
    return _load_hub(spec, use_tiny_vae, taesd)
