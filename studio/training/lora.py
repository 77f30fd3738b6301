"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

Each targeted linear layer W gets a trainable low-rank update, W' = W + (α/r)·B·A (eq. 3),
A ∈ R^{r×k} Gaussian, B ∈ R^{d×r} zero, so training starts from the base model exactly.
With `prior_preservation` the same adapters are trained DreamBooth's way (LoRA-DreamBooth).
Saved as diffusers/peft safetensors that `load_lora_weights` reads.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..settings import SettingsError
from .settings import TrainingSettings

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def prepare(pipe, s: TrainingSettings) -> tuple[list, None]:
    """Add the adapters; only their weights train."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    config = LoraConfig(
        r=s.rank, lora_alpha=s.alpha, init_lora_weights="gaussian", target_modules=list(s.targets)
    )
    try:
        pipe.unet.add_adapter(config)
    except ValueError as exc:
        raise SettingsError(
            f"LoRA targets {', '.join(s.targets)} match no layer of the UNet ({exc})"
        ) from None
    modules = [pipe.unet]
    if s.train_text_encoder:
        # peft's own injection: transformers' add_adapter wants a newer peft than the pinned one
        inject_adapter_in_model(
            LoraConfig(
                r=s.rank, lora_alpha=s.alpha, init_lora_weights="gaussian", target_modules=TEXT_TARGETS
            ),
            pipe.text_encoder,
        )
        modules.append(pipe.text_encoder)
    return [p for m in modules for p in m.parameters() if p.requires_grad], None


def frozen_base(pipe, s: TrainingSettings):
    """The base model for the prior term's base-model target: the same UNet and text encoder
    with every adapter layer switched off for the duration of the `with` block (no copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    @contextmanager
    def adapters_off():
        layers = [
            m
            for net in (pipe.unet, pipe.text_encoder)
            for m in net.modules()
            if isinstance(m, BaseTunerLayer)
        ]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield pipe.unet, pipe.text_encoder
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    return adapters_off


def save(pipe, s: TrainingSettings, folder: Path) -> Path:
    """`folder/<name>.safetensors`: peft-format keys (`unet.*.lora_A.weight`, `text_encoder.*`)
    for every target, and each adapter's LoraConfig (rank, alpha, targets) as the file's
    metadata, so `load_lora_weights` restores every layer at the trained scale α/r.

    Not diffusers' `convert_state_dict_to_diffusers`: it renames only attention layers
    (`lora.down`), so a file with resnet or feed-forward targets mixed both layouts, and the
    loader, judging the layout by the first key, silently dropped the attention half."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = {
        "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
        "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict(),
    }
    if s.train_text_encoder:
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
        layers["text_encoder_lora_adapter_metadata"] = pipe.text_encoder.peft_config["default"].to_dict()
    name = f"{s.output_name}.safetensors"
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=name, safe_serialization=True, **layers)
    return folder / name
