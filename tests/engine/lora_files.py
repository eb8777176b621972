"""LoRA files for tests: peft adapters with random weights on a built-in model, saved as diffusers or kohya files.

`make_lora` puts the adapters on a fresh built-in model (which then serves as the unfused reference: peft adapters
active) and writes them in the format asked for, as a real trainer would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from engine import load_models
from engine.models import ModelBundle

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "test_lora"


def _adapters(models: ModelBundle, rank: int, alpha: float, text: bool, seed: int) -> dict[str, LoraConfig]:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        configs = {"unet": LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)}
        inject_adapter_in_model(configs["unet"], models.unet, adapter_name=ADAPTER)
        if text:
            for name, encoder in models.text_encoders().items():
                configs[name] = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                           target_modules=TEXT_TARGETS)
                inject_adapter_in_model(configs[name], encoder, adapter_name=ADAPTER)
    finally:
        torch.random.set_rng_state(generator_state)
    return configs


def set_reference_scale(models: ModelBundle, scale: float) -> None:
    """Every adapter layer of `make_lora`'s reference model at `scale`."""
    from peft.tuners.lora import LoraLayer

    for module in (models.unet, *models.text_encoders().values()):
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale(ADAPTER, scale)


def make_lora(folder: Path, model: str = "tiny", fmt: str = "diffusers", rank: int = 4, alpha: float = 8.0,
              text: bool = True, seed: int = 1) -> tuple[Path, ModelBundle]:
    """Write a random LoRA for built-in `model` into `folder` (`diffusers`: `pytorch_lora_weights.safetensors`
    with its peft config as metadata; `kohya`: `lora_kohya.safetensors` with `.alpha` tensors and the
    `text_model.` naming of real files). Returns the file and the reference model with the adapters active."""
    models = load_models(model)
    configs = _adapters(models, rank, alpha, text, seed)
    layers = {name: get_peft_model_state_dict(module, adapter_name=ADAPTER)
              for name, module in {"unet": models.unet, **models.text_encoders()}.items() if name in configs}
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        writer = StableDiffusionXLPipeline if models.family == "sdxl" else StableDiffusionPipeline
        metadata = {name: config.to_dict() for name, config in configs.items()}
        arguments = {"unet_lora_layers": convert_state_dict_to_diffusers(layers["unet"]),
                     "unet_lora_adapter_metadata": metadata["unet"]}
        for name in ("text_encoder", "text_encoder_2"):
            if name in layers:
                arguments[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers[name])
                arguments[f"{name}_lora_adapter_metadata"] = metadata[name]
        writer.save_lora_weights(folder, safe_serialization=True, **arguments)
        return folder / "pytorch_lora_weights.safetensors", models
    peft_format = {f"unet.{key}": value for key, value in layers["unet"].items()}
    for name in ("text_encoder", "text_encoder_2"):
        # Real files name every text-encoder layer under `text_model.` (recent transformers flatten CLIPTextModel).
        peft_format.update({f"{name}.{key if key.startswith('text_model.') else 'text_model.' + key}": value
                            for key, value in layers.get(name, {}).items()})
    kohya = convert_state_dict_to_kohya(peft_format)
    kohya.update({key: torch.tensor(float(alpha)) for key in kohya if key.endswith(".alpha")})
    path = folder / "lora_kohya.safetensors"
    save_file({key: value.contiguous() for key, value in kohya.items()}, str(path))
    return path, models
