"""Tiny randomly initialised pipelines in the real diffusers formats, for fast tests only.

They stand in where a test needs a model folder but not a trained one (loading paths,
bit-identity with the bare pipeline, call counting, caching); tests that judge pictures
use the trained toy models in assets/models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.toyworld.train.common import build_tokenizer


def _text_encoder(tokenizer, with_projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        **extra,
    )


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_text_encoder(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, with_projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, with_projection=True),
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_ip2p(folder: Path, sd_folder: Path) -> Path:
    """The tiny SD pipeline with its UNet widened to 8 input channels, saved as InstructPix2Pix."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    from studio.toyworld.train.ip2p import widen_unet

    torch.manual_seed(1)
    sd = StableDiffusionPipeline.from_pretrained(sd_folder)
    unet = widen_unet(sd.unet)
    with torch.no_grad():  # a random image branch, so that image guidance changes the output
        unet.conv_in.weight[:, 4:].normal_(0, 0.05)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pipe(sd, unet=unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_controlnet(folder: Path, base_folder: Path, *, trained: bool = True, seed: int = 2) -> Path:
    """A ControlNet of the tiny SD (or SDXL) UNet; `trained`: zero convolutions made random,
    so that the map changes the picture (a fresh one leaves it exactly as it was)."""
    from diffusers import ControlNetModel, DiffusionPipeline

    from studio.toyworld.train.controlnet import zero_convolutions

    torch.manual_seed(seed)
    unet = DiffusionPipeline.from_pretrained(base_folder).unet
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    if trained:
        with torch.no_grad():
            for conv in zero_convolutions(net):
                conv.weight.normal_(0, 0.3)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_adapter(folder: Path, seed: int = 3) -> Path:
    """A T2I-Adapter for the tiny SD UNet (features of 16 and 32 channels, 8× down)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    adapter = T2IAdapter(
        in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter"
    )
    adapter.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_ip_adapter(folder: Path, base_folder: Path, seed: int = 4) -> Path:
    """An IP-Adapter for the tiny SD UNet in load_ip_adapter's layout, with a tiny CLIP vision
    encoder in `image_encoder/`; W'_k, W'_v random so that the reference changes the picture."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from studio.toyworld.train.ip_adapter import adapter_state_dict, attach

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    ).eval()
    unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet")
    adapter = attach(unet, encoder.config.projection_dim)
    with torch.no_grad():
        for layer in adapter["layers"]:
            layer.to_k_ip[0].weight.normal_(0, 0.5)
            layer.to_v_ip[0].weight.normal_(0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(adapter), str(folder / "ip-adapter_tiny.safetensors"))
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "image_encoder"
    )
    return folder


def _plus_original_keys(state: dict) -> dict:
    """IPAdapterPlusImageProjection's tensors under the published Resampler's names (the names
    InstantID's ip-adapter.bin uses), which load_ip_adapter converts back."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, state[key.replace("to_k.", "to_v.")]])
            continue
        if rest.startswith("attn.to_v."):
            continue
        mapped = {
            "ln0": "0.norm1",
            "ln1": "0.norm2",
            "attn.to_q": "0.to_q",
            "attn.to_out.0": "0.to_out",
            "ff.0": "1.0",
            "ff.1.net.0.proj": "1.1",
            "ff.1.net.2": "1.3",
        }
        stem, _, leaf = rest.rpartition(".")
        out[f"layers.{i}.{mapped[stem]}.{leaf}"] = value
    return out


def build_tiny_instantid(folder: Path, sdxl_folder: Path, embed_dim: int = 16, seed: int = 5) -> Path:
    """InstantID's files for the tiny SDXL: IdentityNet (a ControlNet) in ControlNetModel/ and the
    identity adapter (Resampler image projection, 4 queries) as ip-adapter.safetensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file

    from studio.toyworld.train.ip_adapter import cross_attention_layers, hidden_size

    build_tiny_controlnet(folder / "ControlNetModel", sdxl_folder, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sdxl_folder, subfolder="unet")
    width = unet.config.cross_attention_dim
    projection = IPAdapterPlusImageProjection(
        embed_dims=embed_dim, output_dims=width, hidden_dims=64, heads=1, num_queries=4
    )
    tensors = {f"image_proj.{k}": v for k, v in _plus_original_keys(projection.state_dict()).items()}
    for i, name in enumerate(cross_attention_layers(unet)):
        for kv in ("k", "v"):
            tensors[f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight"] = (
                torch.randn(hidden_size(unet, name), width) * 0.5
            )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "ip-adapter.safetensors"))
    return folder
