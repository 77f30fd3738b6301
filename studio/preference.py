"""Human-preference scores of (picture, prompt) pairs: PickScore, HPSv2 and ImageReward.

- PickScore (Kirstain et al., "Pick-a-Pic", NeurIPS 2023): CLIP ViT-H/14 fine-tuned on people's
  choices; a pair's score is exp(logit_scale) · cos(E_image, E_text), as the reference code in
  the yuvalkirstain/PickScore README computes it (transformers CLIPModel yuvalkirstain/PickScore_v1,
  processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
- HPSv2 (Wu et al., "Human Preference Score v2", 2023): open_clip ViT-H-14 fine-tuned on HPD v2;
  a pair's score is ⟨E_image/‖E_image‖, E_text/‖E_text‖⟩, as hpsv2's img_score.py computes it
  (the diagonal of image_features @ text_features.T). Its checkpoint HPS_v2_compressed.pt is a
  pickle: `convert_hpsv2` reads it once with torch.load(weights_only=True) and writes
  safetensors (`python -m studio convert-hpsv2 FILE`), naming the open_clip architecture in the
  file's metadata.
- ImageReward (Xu et al., NeurIPS 2023): BLIP's image-grounded text encoder and an MLP head,
  ported to transformers' BLIP classes in `studio.image_reward` (image-reward 1.5 itself needs
  OpenAI's clip package, which is not on PyPI, and helpers transformers 5 removed); its pickled
  ImageReward.pt is converted once (`python -m studio convert-image-reward ImageReward.pt`), its
  tokenizer is bert-base-uncased's.

A run reports the mean over its pictures. Models are looked for in the studio's metrics folder
(data/library/metrics/) first, then in the Hugging Face cache (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .image_reward import CHECKPOINT as IMAGEREWARD
from .image_reward import TOKENIZER as IMAGEREWARD_TOKENIZER
from .image_reward import WEIGHTS_NAME as IMAGEREWARD_NAME
from .models import ModelError

METRICS = ("imagereward", "hpsv2", "pickscore")
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2 = ("xswu/HPSv2", "HPS_v2_compressed.pt")
HPSV2_NAME = "hpsv2.safetensors"
HPSV2_ARCHITECTURE = "ViT-H-14"
BATCH = 32


def local_folder(folder: Path | None, repo: str, probe: str) -> Path | None:
    """A hub repo's files on disk: `folder`/NAME, else its snapshot in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    if folder is not None and (folder / repo.split("/")[1] / probe).is_file():
        return folder / repo.split("/")[1]
    cached = try_to_load_from_cache(repo, probe)
    return Path(cached).parent if isinstance(cached, str) else None


def pickscore_folders(folder: Path | None) -> tuple[Path | None, Path | None]:
    """PickScore's model folder (with model.safetensors) and its processor's folder."""
    return (
        local_folder(folder, PICKSCORE, "model.safetensors"),
        local_folder(folder, PICKSCORE_PROCESSOR, "preprocessor_config.json"),
    )


def bert_folder(folder: Path | None) -> Path | None:
    """bert-base-uncased's tokenizer files (ImageReward's), under either of its hub names."""
    found = local_folder(folder, IMAGEREWARD_TOKENIZER, "vocab.txt")
    return found or local_folder(None, IMAGEREWARD_TOKENIZER.split("/")[1], "vocab.txt")


def missing(metric: str, folder: Path | None) -> str:
    """Why `metric` can't run here ("" when it can): what is missing and where it was looked for."""
    where = "the Hugging Face cache" + (f" or {folder}/" if folder else "")
    if metric == "imagereward":
        lacking = []
        if folder is None or not (folder / IMAGEREWARD_NAME).is_file():
            cached = local_folder(None, *IMAGEREWARD)
            source = cached / IMAGEREWARD[1] if cached else IMAGEREWARD[1]
            target = folder / IMAGEREWARD_NAME if folder else IMAGEREWARD_NAME
            lacking.append(
                f"{IMAGEREWARD[0]}'s {IMAGEREWARD[1]} converted once into {target} with "
                f"python -m studio convert-image-reward {source} (its med_config.json beside it)"
            )
        if bert_folder(folder) is None:
            lacking.append(f"the tokenizer of {IMAGEREWARD_TOKENIZER} (vocab.txt) in {where}")
        return f"imagereward needs {' and '.join(lacking)}" if lacking else ""
    if metric == "pickscore":
        model, processor = pickscore_folders(folder)
        lacking = [f"{PICKSCORE} (model.safetensors)"] if model is None else []
        lacking += [f"the processor of {PICKSCORE_PROCESSOR}"] if processor is None else []
        return (
            f"pickscore needs {' and '.join(lacking)} in {where}; none is on this machine" if lacking else ""
        )
    if folder is not None and (folder / HPSV2_NAME).is_file():
        return ""
    cached = local_folder(None, *HPSV2)
    found = f"; {HPSV2[1]} is at {cached / HPSV2[1]}" if cached else ""
    return (
        f"hpsv2 needs the HPS v2 checkpoint ({HPSV2[0]}'s {HPSV2[1]}) converted to safetensors once "
        f"with python -m studio convert-hpsv2 FILE{found}"
    )


def load(metric: str, folder: Path | None, device: str = "cpu"):
    """The scorer of an available metric (`missing` says why one is not)."""
    why = missing(metric, folder)
    if why:
        raise ModelError(why)
    if metric == "pickscore":
        return PickScore(*pickscore_folders(folder), device=device)
    if metric == "imagereward":
        from .image_reward import ImageReward

        return ImageReward(folder / IMAGEREWARD_NAME, bert_folder(folder), device=device)
    return HPSv2(folder / HPSV2_NAME, device=device)


class PickScore:
    def __init__(self, model_folder: Path, processor_folder: Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_folder, use_safetensors=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_folder)
        self.device = device

    def scores(self, images, prompts) -> np.ndarray:
        """exp(logit_scale) · cos(image, prompt), one per pair."""
        import torch

        from .metrics import projected

        out = []
        with torch.no_grad():
            scale = float(self.model.logit_scale.exp())
            for i in range(0, len(images), BATCH):
                pixels = self.processor(images=images[i : i + BATCH], return_tensors="pt").pixel_values
                text = self.processor(
                    text=list(prompts[i : i + BATCH]),
                    padding=True,
                    truncation=True,
                    max_length=77,
                    return_tensors="pt",
                )
                a = projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))
                b = projected(
                    self.model.get_text_features(
                        input_ids=text.input_ids.to(self.device),
                        attention_mask=text.attention_mask.to(self.device),
                    )
                )
                out.append(scale * _cosine(a, b))
        return np.concatenate(out)


class HPSv2:
    def __init__(self, path: Path, device: str = "cpu"):
        import open_clip
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            architecture = (f.metadata() or {}).get("open_clip_model", HPSV2_ARCHITECTURE)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                architecture, pretrained=None, device=device
            )
            open_clip.load_checkpoint(self.model, str(path))
        except RuntimeError as exc:
            raise ModelError(
                f"{path} is not an HPS v2 {architecture} checkpoint ({str(exc).splitlines()[0]})"
            ) from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.device = device

    def scores(self, images, prompts) -> np.ndarray:
        """⟨normalised image features, normalised text features⟩, one per pair."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                pixels = torch.stack([self.preprocess(im) for im in images[i : i + BATCH]]).to(self.device)
                tokens = self.tokenizer(list(prompts[i : i + BATCH])).to(self.device)
                a = self.model.encode_image(pixels, normalize=True)
                b = self.model.encode_text(tokens, normalize=True)
                out.append((a * b).sum(-1).float().cpu().numpy())
        return np.concatenate(out)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def convert_hpsv2(source: Path, target: Path, architecture: str = HPSV2_ARCHITECTURE) -> Path:
    """HPS v2's published checkpoint (`{"state_dict": ...}`, as hpsv2 loads it) as safetensors at
    `target`, read with torch.load(weights_only=True): no code in the file runs. The open_clip
    architecture it fine-tunes is written into the file's metadata."""
    import torch
    from safetensors.torch import save_file

    try:
        data = torch.load(str(source), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{source} does not exist") from None
    except Exception as exc:
        raise ModelError(
            f"{source.name} could not be read as plain tensors ({str(exc).splitlines()[0]})"
        ) from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{source.name} is not a plain state dict of tensors")
    state = {k.removeprefix("module."): v.contiguous() for k, v in state.items()}
    if not {"logit_scale", "visual.proj"} <= set(state):
        raise ModelError(f"{source.name} is not an open_clip CLIP checkpoint (no logit_scale / visual.proj)")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={"format": "pt", "open_clip_model": architecture})
    return target
