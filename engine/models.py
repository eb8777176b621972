"""Model loading: one `ModelBundle` from a hub id, a local diffusers folder, a single file, or a
built-in seeded random model of the real architecture (`tiny`, `small`, `tiny-sdxl`).

Two families: SD 1.x/2.x (one CLIP text encoder) and SDXL (two, with pooled text embeddings and time ids as
added conditioning; sdxl-turbo, SDXL + LCM-LoRA). A folder or hub model with `text_encoder_2/`, and a single
file with SDXL's second text encoder (`conditioner.embedders.1.*`), load as SDXL.

Every failure is a `ModelLoadError` whose message says what was tried and what to do instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .builtin_models import BUILTIN_MODELS, build_byte_level_tokenizer, build_modules
from .config import LoraSpec

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_HUB_MODEL", "DEFAULT_TAESD", "DEFAULT_TAESDXL", "DEMO_MODEL_DIR", "TINY_VAE_SUBFOLDER",
    "ModelBundle", "ModelLoadError",
    "build_builtin", "build_byte_level_tokenizer", "load_models",
]

DEFAULT_HUB_MODEL = "stabilityai/sd-turbo"
DEFAULT_TAESD = "madebyollin/taesd"
#: SDXL's latents differ from SD's: its tiny VAE is TAESDXL.
DEFAULT_TAESDXL = "madebyollin/taesdxl"
# Our convention for a TAESD shipped inside a saved model folder (real hub models keep it apart).
TINY_VAE_SUBFOLDER = "vae_tiny"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# The trained offline stylizer (`python -m training.demo_model`), committed with the code: spec `demo`.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WHAT_TO_PASS = "Pass a local diffusers folder, a `.safetensors` file (with `--model-config FOLDER`), or `tiny`."


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message says what was tried and what to do."""


@dataclass
class ModelBundle:
    """The shared, read-only model set that every stream of one engine configuration uses.

    Args:
        name (`str`): the spec the bundle was loaded from.
        tokenizer (`CLIPTokenizer`): the prompt tokenizer.
        text_encoder (`CLIPTextModel`): the prompt encoder.
        unet (`UNet2DConditionModel`): the denoiser (ε-prediction).
        vae (`AutoencoderTiny | AutoencoderKL`): the VAE the engine runs (TAESD by default).
        scheduler (`LCMScheduler`): the noise schedule and LCM boundary scalings.
        full_vae (`AutoencoderKL | None`, defaults to None): the model's own VAE, when it has one.
        tokenizer_2 (`CLIPTokenizer | None`, defaults to None): SDXL's second tokenizer.
        text_encoder_2 (`CLIPTextModelWithProjection | None`, defaults to None): SDXL's second text encoder
            (penultimate hidden states beside the first encoder's, and the pooled text embedding).
        loras (`tuple[LoraSpec, ...]`, defaults to none): the LoRAs fused into these modules (`engine.lora`).
        controlnet (`ControlNetModel | None`, defaults to None): the ControlNet run beside the UNet
            (`engine.controlnet`).
    """

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderTiny | AutoencoderKL
    scheduler: LCMScheduler
    full_vae: AutoencoderKL | None = None
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    loras: tuple[LoraSpec, ...] = ()
    controlnet: ControlNetModel | None = None

    @property
    def family(self) -> str:
        """`sdxl` for a model with two text encoders and SDXL's added conditioning, else `sd` (SD 1.x/2.x)."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side."""
        return 8

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by their diffusers component name (`text_encoder`, and `text_encoder_2` for SDXL)."""
        encoders = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = self.text_encoder_2
        return encoders

    def to(self, device: torch.device, dtype: torch.dtype) -> ModelBundle:
        """Move every module to `device`/`dtype` in place and put it in eval mode."""
        extra = () if self.controlnet is None else (self.controlnet,)
        for module in (*self.text_encoders().values(), self.unet, self.vae, *extra):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Save as a diffusers folder (with the tiny VAE in `vae_tiny/`) loadable by `load_models`.

        The folder is also a valid `StableDiffusionPipeline` folder for diffusers itself; diffusers
        ignores `vae_tiny/`, which is not listed in `model_index.json`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        if self.family == "sdxl":
            self.tokenizer_2.save_pretrained(folder / "tokenizer_2")
            self.text_encoder_2.save_pretrained(folder / "text_encoder_2")
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        full_vae = self.full_vae if self.full_vae is not None else self.vae
        has_full_vae = isinstance(full_vae, AutoencoderKL)
        if has_full_vae:
            full_vae.save_pretrained(folder / "vae")
        if isinstance(self.vae, AutoencoderTiny):
            self.vae.save_pretrained(folder / TINY_VAE_SUBFOLDER)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "unet": ["diffusers", type(self.unet).__name__],
            "vae": ["diffusers", "AutoencoderKL"] if has_full_vae else [None, None],
        }
        if self.family == "sdxl":
            for sd_only in ("requires_safety_checker", "safety_checker"):
                del index[sd_only]
            index.update({
                "_class_name": "StableDiffusionXLPipeline",
                "force_zeros_for_empty_prompt": True,
                "text_encoder_2": ["transformers", type(self.text_encoder_2).__name__],
                "tokenizer_2": ["transformers", type(self.tokenizer_2).__name__],
            })
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def build_builtin(name: str, seed: int = 0) -> ModelBundle:
    """Build the seeded, randomly initialised built-in model `name` of the real classes (`BUILTIN_MODELS`)."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; built-ins are {', '.join(BUILTIN_MODELS)}")
    modules = build_modules(name, seed=seed)
    return ModelBundle(name=name, tokenizer=modules.tokenizer, text_encoder=modules.text_encoder,
                       unet=modules.unet, vae=modules.tiny_vae, scheduler=modules.scheduler,
                       full_vae=modules.full_vae, tokenizer_2=modules.tokenizer_2,
                       text_encoder_2=modules.text_encoder_2)


# --------------------------------------------------------------------------- helpers


def _looks_like_path(spec: str) -> bool:
    windows_drive = re.match(r"^[A-Za-z]:", spec) is not None
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or windows_drive


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_hint() -> str:
    return "offline mode is on: HF_HUB_OFFLINE=1" if _hub_offline() else "the hub may be unreachable"


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().rstrip('.')}"


def _to_lcm(scheduler_config: dict, source: str) -> LCMScheduler:
    """The LCM scheduler of the model's noise schedule (same betas/alphas, whatever class it was saved as)."""
    scheduler = LCMScheduler.from_config(scheduler_config)
    saved_as = scheduler_config.get("_class_name", "an unnamed scheduler")
    if saved_as != "LCMScheduler":
        logger.info("using the noise schedule of %s's %s as an LCMScheduler", source, saved_as)
    if scheduler.config.prediction_type != "epsilon":
        raise ModelLoadError(
            f"{source!r} predicts {scheduler.config.prediction_type!r}; the engine's LCM step needs an "
            "ε-prediction model (SD 1.x/2.x base, sd-turbo). Pick an epsilon-prediction model."
        )
    return scheduler


def _require_diffusers_folder(folder: Path, role: str) -> None:
    missing = [part for part in ("model_index.json", "unet", "scheduler") if not (folder / part).exists()]
    if missing:
        raise ModelLoadError(
            f"{role} {str(folder)!r} is not a diffusers folder (missing {', '.join(missing)}). "
            "Pass a folder saved with `save_pretrained` (model_index.json, unet/, scheduler/, ...), "
            "a hub id, a `.safetensors` file, or `tiny`."
        )


def _check_weights_loaded(source: str, modules: dict[str, torch.nn.Module]) -> None:
    """Weights a checkpoint lacked stay on the meta device under diffusers' low-memory loading."""
    for name, module in modules.items():
        missing = [param for param, value in module.named_parameters() if value.is_meta]
        if missing:
            raise ModelLoadError(
                f"{source!r} lacks {len(missing)} weights of the {name} (e.g. {missing[0]!r}): the checkpoint and "
                "its config are not the same architecture. Pass `--model-config` a folder of this model's architecture."
            )


# --------------------------------------------------------------------------- VAE choice


def _load_tiny_vae(source: str, why: str) -> AutoencoderTiny:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"TAESD folder {source!r} has no config.json: pass `--taesd` a folder saved with "
                "`AutoencoderTiny.save_pretrained`, or use the model's full VAE (`--vae full`)."
            )
        local_only = True
    elif _is_hub_id(source):
        local_only = False
    else:
        raise ModelLoadError(
            f"TAESD folder {source!r} does not exist: pass `--taesd` an existing AutoencoderTiny folder or a hub id "
            f"(default {DEFAULT_TAESD}), or use the model's full VAE (`--vae full`)."
        )
    try:
        return AutoencoderTiny.from_pretrained(str(path) if local_only else source, local_files_only=local_only)
    except Exception as error:  # diffusers raises OSError, ValueError or hub errors here
        hint = f" ({_hub_hint()})" if not local_only else ""
        raise ModelLoadError(
            f"could not load the tiny VAE (TAESD) from {source!r}{why}{hint}: {_reason(error)}. "
            "Pass `--taesd FOLDER` with a local AutoencoderTiny folder, or use the model's full VAE (`--vae full`)."
        ) from error


def _choose_vae(
    name: str, full_vae: AutoencoderKL | None, use_tiny_vae: bool, taesd: str | None, folder: Path | None,
    family: str = "sd",
) -> AutoencoderTiny | AutoencoderKL:
    if not use_tiny_vae:
        if full_vae is None:
            raise ModelLoadError(f"model {name!r} has no full VAE (no vae/ folder): use the tiny VAE instead")
        return full_vae
    if taesd is not None:
        return _load_tiny_vae(taesd, why="")
    if folder is not None and (folder / TINY_VAE_SUBFOLDER).is_dir():
        return _load_tiny_vae(str(folder / TINY_VAE_SUBFOLDER), why="")
    default = DEFAULT_TAESDXL if family == "sdxl" else DEFAULT_TAESD
    logger.info("model %s has no %s/; loading the tiny VAE from %s", name, TINY_VAE_SUBFOLDER, default)
    return _load_tiny_vae(default, why=f" because {name!r} has no {TINY_VAE_SUBFOLDER}/ folder")


# --------------------------------------------------------------------------- sources


def _load_folder(folder: Path, use_tiny_vae: bool, taesd: str | None, name: str) -> ModelBundle:
    _require_diffusers_folder(folder, "model")
    sdxl = (folder / "text_encoder_2").is_dir()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2") if sdxl else None
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2") if sdxl else None
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        scheduler_config = LCMScheduler.load_config(folder / "scheduler")
        # Only read the full VAE when it runs: a real one is hundreds of MB.
        want_full_vae = not use_tiny_vae and (folder / "vae").is_dir()
        full_vae = AutoencoderKL.from_pretrained(folder / "vae") if want_full_vae else None
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(
            f"could not load the diffusers folder {str(folder)!r}: {_reason(error)}. It needs tokenizer/, "
            "text_encoder/, unet/ and scheduler/ (SDXL: also tokenizer_2/ and text_encoder_2/; and vae/ for "
            "`--vae full`) as written by `save_pretrained`."
        ) from error
    scheduler = _to_lcm(scheduler_config, name)
    vae = _choose_vae(name, full_vae, use_tiny_vae, taesd, folder, "sdxl" if sdxl else "sd")
    return ModelBundle(name=name, tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                       scheduler=scheduler, full_vae=full_vae, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def _load_hub(repo_id: str, use_tiny_vae: bool, taesd: str | None) -> ModelBundle:
    from huggingface_hub import snapshot_download

    logger.info("fetching %s from the model hub (or its local cache)", repo_id)
    # SDXL's second encoder: SD repos have no such folders, so these patterns fetch nothing there.
    parts = ["model_index.json", "tokenizer/*", "text_encoder/*", "tokenizer_2/*", "text_encoder_2/*", "unet/*",
             "scheduler/*"]
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=parts if use_tiny_vae else [*parts, "vae/*"],
            ignore_patterns=["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*fp16*", "*.non_ema.*"],
        )
    except Exception as error:  # offline, unknown repo, gated repo, no network, ...
        also = f" There is no local path {repo_id!r} either." if not Path(repo_id).exists() else ""
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({_hub_hint()}): "
            f"{_reason(error)}.{also} {_WHAT_TO_PASS}"
        ) from error
    return _load_folder(Path(folder), use_tiny_vae, taesd, name=repo_id)


def _inferred_config_name(path: Path) -> str:
    """The hub repo diffusers would fetch a config from for this checkpoint (for error messages)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    try:
        return fetch_diffusers_config(load_single_file_checkpoint(str(path)))["pretrained_model_name_or_path"]
    except Exception:  # the message falls back to a generic wording
        return "a hub config"


def _check_checkpoint_layout(path: Path) -> str:
    """Read a `.safetensors` header (not its tensors) to reject what is not an SD checkpoint early; returns its
    family: `sdxl` when it holds SDXL's second text encoder (`conditioner.embedders.1.*`), else `sd`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception as error:  # safetensors raises SafetensorError, OSError, ...
        raise ModelLoadError(
            f"{str(path)!r} is not a readable safetensors checkpoint ({_reason(error)}). {_WHAT_TO_PASS}"
        ) from error
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise ModelLoadError(
            f"{str(path)!r} is not a Stable Diffusion checkpoint in the original single-file layout (no "
            f"`model.diffusion_model.*` weights among its {len(keys)} tensors). For a diffusers-layout model pass "
            f"its folder instead. {_WHAT_TO_PASS}"
        )
    return "sdxl" if any(key.startswith("conditioner.embedders.1.") for key in keys) else "sd"


def _load_single_file(path: Path, use_tiny_vae: bool, taesd: str | None, config: str | None) -> ModelBundle:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    config_folder = Path(config).expanduser() if config is not None and Path(config).expanduser().exists() else None
    if path.suffix == ".safetensors":
        family = _check_checkpoint_layout(path)
    else:  # a pickled `.ckpt` is not opened before diffusers reads it: its config folder says what it is
        family = "sdxl" if config_folder is not None and (config_folder / "text_encoder_2").is_dir() else "sd"
    if config_folder is not None:
        _require_diffusers_folder(config_folder, "model config")
    elif config is not None and not _is_hub_id(config):
        raise ModelLoadError(
            f"model config {config!r} is neither an existing diffusers folder nor a hub id: pass "
            "`--model-config` a local diffusers folder of the checkpoint's architecture."
        )
    pipeline_class, extra = StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None,
                                                      "requires_safety_checker": False}
    if family == "sdxl":
        pipeline_class, extra = StableDiffusionXLPipeline, {}
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(config_folder) if config_folder is not None else config,
            local_files_only=config_folder is not None, **extra,
        )
    except Exception as error:  # diffusers raises many types here: bad file, hub errors, key errors
        if config is None:
            tried = (f"without a config: diffusers inferred the architecture config "
                     f"{_inferred_config_name(path)!r} from its weights and could not fetch it ({_hub_hint()})")
            todo = "Pass `--model-config FOLDER` (`config=`): a local diffusers folder of the same architecture."
        else:
            tried = f"with the config {config!r}"
            todo = ("Check that the file is a Stable Diffusion checkpoint (LDM layout) of the config's "
                    "architecture, or pass `--model-config` a local diffusers folder that matches it.")
            if "meta tensor" in str(error):  # diffusers leaves weights the file lacks unloaded, then fails
                tried += " (the checkpoint lacks weights that the config's architecture has)"
        raise ModelLoadError(
            f"could not load the single-file checkpoint {str(path)!r} {tried}: {_reason(error)}. "
            f"{todo}"
        ) from error
    encoders = {"text encoder": pipe.text_encoder}
    if family == "sdxl":
        encoders["second text encoder"] = pipe.text_encoder_2
    _check_weights_loaded(str(path), {"unet": pipe.unet, **encoders, "VAE": pipe.vae})
    # The pipeline rewrites outdated scheduler configs in place; read the config's own file when we have it.
    scheduler_config = (LCMScheduler.load_config(config_folder / "scheduler") if config_folder is not None
                        else dict(pipe.scheduler.config))
    scheduler = _to_lcm(scheduler_config, str(path))
    vae = _choose_vae(path.name, pipe.vae, use_tiny_vae, taesd, config_folder, family)
    # Like a folder load, keep the full VAE only when it runs (SD 1.x's is ~320 MB in fp32).
    second = {"tokenizer_2": pipe.tokenizer_2, "text_encoder_2": pipe.text_encoder_2} if family == "sdxl" else {}
    return ModelBundle(name=str(path), tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet,
                       vae=vae, scheduler=scheduler, full_vae=None if use_tiny_vae else pipe.vae, **second)


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
        spec (`str`, defaults to `"tiny"`): a built-in seeded random model (`BUILTIN_MODELS`), `demo` (the
            trained offline stylizer in `engine/demo_model/`), a local
            diffusers folder, a single `.safetensors`/`.ckpt` checkpoint in the original SD layout, or a
            hub id such as `stabilityai/sd-turbo`.
        use_tiny_vae (`bool`, defaults to True): use `AutoencoderTiny` (TAESD); else the model's `AutoencoderKL`.
        taesd (`str | None`, defaults to None): hub id or folder of a TAESD; by default the model folder's
            (or, for a single file, the config folder's) `vae_tiny/`, else `madebyollin/taesd` (SDXL:
            `madebyollin/taesdxl`).
        config (`str | None`, defaults to None): for single files, a local diffusers folder (or hub id) of the
            same architecture; without it diffusers infers a hub config, which needs the hub.
        seed (`int`, defaults to 0): seed of the built-in models' weights.

    Raises:
        ModelLoadError: naming what was tried and what to do instead.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"empty model spec {spec!r}: pass `tiny`, a local path, or a hub id such as "
                             f"{DEFAULT_HUB_MODEL}")
    logger.info("loading model %r", spec)
    if spec in BUILTIN_MODELS:
        bundle = build_builtin(spec, seed=seed)
        if not use_tiny_vae:
            bundle.vae = bundle.full_vae
        elif taesd is not None:
            bundle.vae = _load_tiny_vae(taesd, why="")
        return bundle
    if spec == "demo":
        if not (DEMO_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"the demo model is missing from {str(DEMO_MODEL_DIR)!r}: "
                                 "rebuild it with `python -m training.demo_model` from a checkout")
        return _load_folder(DEMO_MODEL_DIR, use_tiny_vae, taesd, name="demo")
    path = Path(spec).expanduser()
    if spec.endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {spec!r} does not exist. {_WHAT_TO_PASS}")
        return _load_single_file(path, use_tiny_vae, taesd, config)
    if path.is_dir():
        return _load_folder(path, use_tiny_vae, taesd, name=spec)
    if path.exists():
        raise ModelLoadError(
            f"{spec!r} is a file but not a checkpoint (expected {' or '.join(SINGLE_FILE_SUFFIXES)}). {_WHAT_TO_PASS}"
        )
    if _is_hub_id(spec):
        return _load_hub(spec, use_tiny_vae, taesd)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path {spec!r} does not exist. {_WHAT_TO_PASS}")
    raise ModelLoadError(
        f"model spec {spec!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), an existing path, nor a hub "
        f"id of the form owner/name (e.g. {DEFAULT_HUB_MODEL}). {_WHAT_TO_PASS}"
    )
