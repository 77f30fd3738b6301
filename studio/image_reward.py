"""ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", NeurIPS 2023) on transformers' BLIP classes.

A (prompt, picture) pair's reward, as image-reward 1.5's `ImageReward.score` computes it:
  v = ViT(picture)                    BLIP's ViT-L/16 image tokens at 224 px (BlipVisionModel)
  h = BERT(prompt; cross-attend v)    BLIP's image-grounded text encoder, bidirectional, every
                                      layer cross-attending (BlipTextModel with is_decoder layers)
  score = (MLP(h[CLS]) − 0.16717362830052426) / 1.0333394966054072
The MLP is Linear 768→1024→128→64→16→1 with no activation between (its dropouts are idle at
evaluation); the mean and std standardise the reward over the paper's training pairs. The
picture is resized (bicubic, short side) and centre-cropped to 224, made RGB and normalised with
CLIP's mean and std; the prompt is tokenised by bert-base-uncased's tokenizer with BLIP's [DEC]
and [ENC] added, padded and truncated to 35 tokens.

Its published checkpoint ImageReward.pt (THUDM/ImageReward) is a pickle of the state dict:
`convert_image_reward` reads it once with torch.load(weights_only=True), renames its tensors to
the transformers modules (`studio_name`) and writes safetensors, the two configurations (from
shapes and the repo's med_config.json) in the file's metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .models import ModelError

WEIGHTS_NAME = "image-reward.safetensors"
CHECKPOINT = ("THUDM/ImageReward", "ImageReward.pt")
TOKENIZER = "google-bert/bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION_HEAD_DIM = 64  # BLIP's ViTs: base 768 / 12 heads, large 1024 / 16
RENAMES = (  # ImageReward's state-dict names → the studio model's; anything else is dropped
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision.encoder.layers.\1.layer_norm\2."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"blip\.text_encoder\.", "text."),
    (r"mlp\.layers\.", "head."),
)


def studio_name(key: str) -> str | None:
    """The studio model's name for one of ImageReward's tensors (None: not used for scoring)."""
    for pattern, name in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, name, key, count=1)
    return None


def build(vision: dict, text: dict):
    """The model on the meta device: `vision` (BlipVisionConfig), `text` (BlipTextConfig), head."""
    import torch
    from torch import nn
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    with torch.device("meta"):
        model = nn.Module()
        model.vision = BlipVisionModel(BlipVisionConfig(**vision))
        model.text = BlipTextModel(BlipTextConfig(**text, is_decoder=True), add_pooling_layer=False)
        model.head = nn.Sequential(  # ImageReward.py's MLP: its indices name the tensors
            nn.Linear(text["hidden_size"], 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
    return model


def load_model(path: Path):
    """The converted file's model with its weights, ready to evaluate."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "vision_config" not in meta:
        raise ModelError(f"{path} was not written by python -m studio convert-image-reward")
    model = fill(
        build(json.loads(meta["vision_config"]), json.loads(meta["text_config"])),
        load_file(str(path)),
        path.name,
    )
    positions = model.text.embeddings.position_ids
    model.text.embeddings.position_ids = torch.arange(positions.shape[-1]).expand(1, -1)
    return model.eval()


def fill(model, state: dict, name: str):
    """`model` holding exactly the tensors of `state` (a missing, extra or misshapen one is named)."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ModelError(f"{name} is not an ImageReward checkpoint ({lines[0] if lines else exc})") from None
    return model


def blip_tokenizer(folder: Path):
    """BLIP's init_tokenizer: bert-base-uncased's with [DEC] as bos and [ENC] added."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward:
    def __init__(self, path: Path, tokenizer_folder: Path, device: str = "cpu"):
        from torchvision import transforms as T

        self.model = load_model(path).to(device)
        self.tokenizer = blip_tokenizer(tokenizer_folder)
        size = self.model.vision.config.image_size
        self.preprocess = T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                lambda image: image.convert("RGB"),
                T.ToTensor(),
                T.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )
        self.device = device

    def scores(self, images, prompts, batch: int = 32) -> np.ndarray:
        """The standardised reward of each (picture, prompt) pair."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                pixels = torch.stack([self.preprocess(im) for im in images[i : i + batch]]).to(self.device)
                text = self.tokenizer(
                    list(prompts[i : i + batch]),
                    padding="max_length",
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model.text(
                    input_ids=text.input_ids,
                    attention_mask=text.attention_mask,
                    encoder_hidden_states=self.model.vision(pixel_values=pixels).last_hidden_state,
                ).last_hidden_state
                reward = self.model.head(hidden[:, 0].float()).squeeze(-1)
                out.append(((reward - MEAN) / STD).cpu().numpy())
        return np.concatenate(out)


def configs(state: dict, med_config: dict) -> tuple[dict, dict]:
    """BlipVisionConfig and BlipTextConfig fields: the ViT's from the tensors' shapes (heads of
    64 channels), the text encoder's from med_config.json, cross-attending to the ViT's width."""
    from transformers import BertConfig

    width = state["vision.embeddings.class_embedding"].shape[-1]
    patch = state["vision.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((state["vision.embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision = dict(
        hidden_size=width,
        intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len({k.split(".")[3] for k in state if k.startswith("vision.encoder.layers.")}),
        num_attention_heads=width // VISION_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    bert = BertConfig(**med_config)  # as BLIP reads it: BERT's defaults where the file is silent
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
    text = {k: getattr(bert, k) for k in keys} | {"encoder_hidden_size": width}
    return vision, text


def convert_image_reward(source: Path, target: Path, med_config: Path | None = None) -> Path:
    """ImageReward.pt (a pickled state dict; read with torch.load(weights_only=True), no code in
    it runs) and its med_config.json (beside it unless given) as one safetensors file."""
    import torch
    from safetensors.torch import save_file

    if not source.is_file():
        raise ModelError(f"{source} does not exist")
    med_config = med_config or source.parent / "med_config.json"
    if not med_config.is_file():
        raise ModelError(
            f"{med_config} does not exist: give THUDM/ImageReward's med_config.json with --med-config FILE"
        )
    try:
        data = torch.load(str(source), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{source.name} could not be read as plain tensors ({str(exc).splitlines()[0]})"
        ) from None
    data = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{source.name} is not a plain state dict of tensors")
    state = {
        name: v.contiguous() for k, v in data.items() if (name := studio_name(k.removeprefix("module.")))
    }
    if "vision.embeddings.class_embedding" not in state or "head.0.weight" not in state:
        raise ModelError(
            f"{source.name} is not an ImageReward checkpoint (no blip.visual_encoder / mlp tensors)"
        )
    try:
        vision, text = configs(state, json.loads(med_config.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{source.name} with {med_config.name} does not describe ImageReward ({exc})"
        ) from None
    model = build(vision, text)  # on the meta device: names and shapes only
    state = {k: v for k, v in state.items() if k in model.state_dict()}  # others unused, as in the package
    fill(model, state, source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "vision_config": json.dumps(vision), "text_config": json.dumps(text)}
    save_file(state, str(target), metadata=metadata)
    return target
