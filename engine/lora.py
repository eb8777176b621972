"""LoRA at load time: fused into the shared UNet and text encoders before any backend compiles them.

A LoRA adds W' = W + s·(α/r)·B·A to some linear and convolution layers. `apply_loras` reads each LoRA with
diffusers (`lora_state_dict`: hub id, folder or `.safetensors` file; the diffusers and the kohya/A1111 formats,
SDXL's kohya block names mapped with the UNet's config), puts it on the modules as a peft adapter at its scale
(the UNet through diffusers' `load_lora_adapter`, the text encoders through peft's `inject_adapter_in_model`, as
diffusers does), merges it into the weights and removes the adapter layers. What is left are plain modules with
new weights: the backends export them, the engine cache's key (`backends.cache.module_fingerprint` hashes the
weights) tells them apart, and no frame pays for an adapter.

Every failure is a `ModelLoadError` that names the LoRA: a file that is no LoRA, weights for layers the model
does not have (another family: an SDXL LoRA on SD 1.5), weights of the wrong shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import LoraSpec
from .models import ModelBundle, ModelLoadError, _hub_hint, _is_hub_id, _reason

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LORA_WEIGHT_NAME", "apply_loras", "fuse_lora", "load_lora", "resolve_lora_file"]

#: The file name diffusers saves a LoRA under; a folder or hub repo with several `.safetensors` files uses it.
DEFAULT_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Keys of one layer's LoRA pair in the formats diffusers reads (peft, diffusers, kohya after its conversion).
_PAIR_SUFFIXES = ("lora_A.weight", "lora_B.weight", "down.weight", "up.weight")


def resolve_lora_file(source: str) -> Path:
    """The `.safetensors` file of a LoRA spec: the file itself, the one file of a folder (or its
    `pytorch_lora_weights.safetensors`), or that of a hub repo fetched with `snapshot_download` (or its cache).

    Raises:
        ModelLoadError: nothing there, no or several candidate files, or the hub unreachable.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"LoRA {source!r} is not a .safetensors file: pass a LoRA saved as safetensors "
                                 "(a hub id, a folder holding one, or the file)")
        return path
    if not path.is_dir():
        if not _is_hub_id(source) or source.endswith(".safetensors"):
            raise ModelLoadError(f"LoRA {source!r} does not exist: pass a hub id (owner/name), a folder holding a "
                                 "LoRA .safetensors file, or the file")
        path = _fetch_from_hub(source)
    candidates = sorted(path.glob("*.safetensors"))
    preferred = [candidate for candidate in candidates if candidate.name == DEFAULT_LORA_WEIGHT_NAME]
    if preferred or len(candidates) == 1:
        return (preferred or candidates)[0]
    found = ", ".join(candidate.name for candidate in candidates) or "none"
    raise ModelLoadError(f"LoRA {source!r} holds {len(candidates)} .safetensors files ({found}): pass the file itself "
                         f"(or name one {DEFAULT_LORA_WEIGHT_NAME})")


def _fetch_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    logger.info("fetching LoRA %s from the model hub (or its local cache)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"]))
    except Exception as error:  # offline, unknown repo, gated repo, no network, ...
        raise ModelLoadError(f"could not fetch LoRA {repo_id!r} from the Hugging Face Hub ({_hub_hint()}): "
                             f"{_reason(error)}. Pass a local folder or .safetensors file instead.") from error


def _read_lora(models: ModelBundle, spec: LoraSpec) -> tuple[dict, dict | None, dict | None]:
    """The LoRA's state dict in diffusers' naming (component prefix first), its network alphas and metadata."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    file = resolve_lora_file(spec.source)
    reader = StableDiffusionXLPipeline if models.family == "sdxl" else StableDiffusionPipeline
    # SDXL kohya files name blocks by the original (SGM) layout: the UNet's config maps them.
    extra = {"unet_config": models.unet.config} if models.family == "sdxl" else {}
    try:
        return reader.lora_state_dict(str(file.parent), weight_name=file.name, return_lora_metadata=True, **extra)
    except Exception as error:  # safetensors, key conversion and format errors
        raise ModelLoadError(f"could not read LoRA {spec.source!r} ({file}): {_reason(error)}") from error


def _pairs(state_dict: dict) -> int:
    return sum(key.endswith(_PAIR_SUFFIXES) for key in state_dict) // 2


def _lora_layers(module: torch.nn.Module, adapter_name: str) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [layer for layer in module.modules() if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A]


def _load_into_text_encoder(encoder: torch.nn.Module, state_dict: dict, network_alphas: dict | None,
                            metadata: dict | None, prefix: str, adapter_name: str) -> None:
    """diffusers' text-encoder LoRA loading with peft itself in place of transformers' `load_adapter` (which
    asks for a newer peft than diffusers does)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    own = {key.removeprefix(f"{prefix}."): value for key, value in state_dict.items() if key.startswith(f"{prefix}.")}
    own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
    if not hasattr(encoder, "text_model"):
        # Recent transformers flatten CLIPTextModel; LoRA files still name `text_model.`.
        own = {key.removeprefix("text_model."): value for key, value in own.items()}
    rank = {key: value.shape[1] for key, value in own.items() if key.endswith("lora_B.weight")}
    alphas = None
    if network_alphas:
        alphas = {key.removeprefix(f"{prefix}."): value for key, value in network_alphas.items()
                  if key.split(".")[0] == prefix}
    own_metadata = None
    if metadata:
        own_metadata = {key.removeprefix(f"{prefix}."): value for key, value in metadata.items()
                        if key.startswith(f"{prefix}.")} or None
    config = _create_lora_config(own, alphas, own_metadata, rank, is_unet=False)
    inject_adapter_in_model(config, encoder, adapter_name=adapter_name)
    set_peft_model_state_dict(encoder, own, adapter_name=adapter_name)


def _components(models: ModelBundle) -> dict[str, torch.nn.Module]:
    return {"unet": models.unet, **models.text_encoders()}


def load_lora(models: ModelBundle, spec: LoraSpec, adapter_name: str) -> None:
    """Put `spec` on the bundle's modules as the peft adapter `adapter_name` at `spec.scale`, not fused: the
    modules then run W·x + scale·(α/r)·B·A·x (`fuse_lora` merges it).

    Raises:
        ModelLoadError: naming the LoRA; the bundle is left without the adapter.
    """
    state_dict, network_alphas, metadata = _read_lora(models, spec)
    not_lora = sorted(key for key in state_dict if "lora" not in key)
    if not state_dict or not_lora:
        example = f" (e.g. {not_lora[0]!r})" if not_lora else ""
        raise ModelLoadError(f"LoRA {spec.source!r} holds no LoRA weights: {len(not_lora)} of its {len(state_dict)} "
                             f"weights are not named lora_*{example}; is it a model checkpoint?")
    components = _components(models)
    wanted = {name: {key: value for key, value in state_dict.items() if key.startswith(f"{name}.")}
              for name in components}
    foreign = sorted(key for key in state_dict if key.split(".")[0] not in components)
    if foreign:
        raise ModelLoadError(
            f"LoRA {spec.source!r} has {len(foreign)} weights for no part of this {models.family.upper()} model "
            f"(e.g. {foreign[0]!r}; it has {', '.join(components)}): it was made for another model family")
    try:
        if wanted["unet"]:
            unet_metadata = metadata if metadata and any(key.startswith("unet.") for key in metadata) else None
            models.unet.load_lora_adapter(state_dict, prefix="unet", adapter_name=adapter_name, metadata=unet_metadata,
                                          network_alphas=None if unet_metadata else network_alphas)
        for name, encoder in models.text_encoders().items():
            if wanted[name]:
                _load_into_text_encoder(encoder, state_dict, network_alphas, metadata, name, adapter_name)
        for name, module in components.items():
            loaded, expected = len(_lora_layers(module, adapter_name)), _pairs(wanted[name])
            if loaded != expected:
                raise ModelLoadError(f"LoRA {spec.source!r} has {expected} layers for the {name} but only {loaded} "
                                     "match its layers: it was made for another model (family or architecture)")
    except ModelLoadError:
        _remove_adapter_layers(components.values())
        raise
    except Exception as error:  # peft: target modules missing, shape mismatches, ...
        _remove_adapter_layers(components.values())
        reason = " ".join(_reason(error).split())[:500]  # peft's messages span lines, one per tensor
        raise ModelLoadError(f"LoRA {spec.source!r} does not fit this {models.family.upper()} model ({reason}): "
                             "it was made for another model family or architecture") from error
    for module in components.values():
        for layer in _lora_layers(module, adapter_name):
            layer.set_scale(adapter_name, spec.scale)


def fuse_lora(models: ModelBundle, adapter_name: str) -> None:
    """Merge adapter `adapter_name` (at its scale) into the weights and remove every adapter layer."""
    components = _components(models).values()
    for module in components:
        for layer in _lora_layers(module, adapter_name):
            layer.merge(adapter_names=[adapter_name])
    _remove_adapter_layers(components)


def _remove_adapter_layers(modules) -> None:
    """Replace peft's layers by their base layers (merged weights stay) and forget the adapters' configs."""
    from diffusers.utils import recurse_remove_peft_layers

    for module in modules:
        recurse_remove_peft_layers(module)
        if hasattr(module, "peft_config"):
            del module.peft_config
        if getattr(module, "_hf_peft_config_loaded", None):
            module._hf_peft_config_loaded = None


@torch.no_grad()
def apply_loras(models: ModelBundle, loras: Sequence[LoraSpec]) -> ModelBundle:
    """Fuse `loras` into the bundle's modules, in order, and record them in `models.loras`.

    Raises:
        ModelLoadError: a LoRA that cannot be read or does not fit, naming it.
        ValueError: the bundle already has LoRAs fused.
    """
    if not loras:
        return models
    if models.loras:
        raise ValueError(f"the model already has LoRAs fused ({', '.join(map(str, models.loras))})")
    for index, spec in enumerate(loras):
        name = f"lora{index}"
        load_lora(models, spec, name)
        fuse_lora(models, name)
        logger.info("fused LoRA %s at scale %g", spec.source, spec.scale)
    models.loras = tuple(loras)
    return models
