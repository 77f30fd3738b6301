"""Image-set metrics: Fréchet distance (FID) and CLIP-Score, over the features a model gives,
and the standard error that goes beside a mean over samples.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017, eq. 6): the Fréchet distance between Gaussians fitted to two
sets of features,

    d² = ||μ₁ − μ₂||² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½).

Tr((Σ₁Σ₂)^½) is computed as the sum of the square roots of the eigenvalues of
Σ₁^½ Σ₂ Σ₁^½ (symmetric, positive semi-definite, same spectrum as Σ₁Σ₂), which stays real
where scipy's general `sqrtm` of the non-symmetric product picks up imaginary noise.
FID is biased upward at small N (Chong & Forsyth, "Effectively Unbiased FID", CVPR 2020):
`fid` says so below MIN_SAMPLES.

CLIP-Score (Hessel et al., "CLIPScore", EMNLP 2021, as torchmetrics reports it):
100 · max(cos(E_image, E_text), 0), averaged over pairs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 2048  # below this, FID's bias is larger than the gaps people report


@dataclass(frozen=True)
class FID:
    value: float
    n_a: int
    n_b: int
    features: str  # which feature space: FIDs over different ones can't be compared
    warning: str = ""


def standard_error(values) -> float:
    """The standard error of the mean of `values`: sample standard deviation / √n (n ≥ 2)."""
    return statistics.stdev(values) / len(values) ** 0.5


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError("FID needs at least two feature vectors a set")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² between N(μ₁, Σ₁) and N(μ₂, Σ₂) (eq. 6 of Heusel et al.)."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # Σ₁^½
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(features_a, features_b, space: str) -> FID:
    """FID between two feature sets (rows are samples), with a warning at small N."""
    mu1, s1 = gaussian(features_a)
    mu2, s2 = gaussian(features_b)
    n_a, n_b = len(features_a), len(features_b)
    warning = ""
    if min(n_a, n_b) < MIN_SAMPLES:
        warning = (
            f"only {min(n_a, n_b)} samples (fewer than {MIN_SAMPLES}): FID is biased upward at small N; "
            "compare only FIDs of equal N"
        )
    return FID(max(0.0, frechet_distance(mu1, s1, mu2, s2)), n_a, n_b, space, warning)


def clip_score(image_embeds, text_embeds) -> float:
    """Mean of 100 · max(cos, 0) over (image, text) pairs."""
    a = np.asarray(image_embeds, dtype=np.float64)
    b = np.asarray(text_embeds, dtype=np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(np.mean(100 * np.clip(cos, 0, None)))


class ClipEmbedder:
    """A CLIP model's image and text embeddings (projection space), with its own processor:
    the toy CLIP offline, a real one (openai/clip-vit-large-patch14, ...) where it is on disk.
    An FID over them names the model: it is not Inception's FID."""

    def __init__(self, folder, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(folder).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.device = device
        self.space = f"CLIP image embeddings of {folder}"
        self.key = str(folder)  # what the features depend on (reference features are cached by it)

    def image_features(self, images, batch: int = 256) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                pixels = self.processor(images=images[i : i + batch], return_tensors="pt").pixel_values
                out.append(projected(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return np.concatenate(out)

    def text_features(self, texts) -> np.ndarray:
        import torch

        ids = self.tokenizer(
            list(texts), padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return projected(self.model.get_text_features(input_ids=ids.to(self.device)))


def projected(output) -> np.ndarray:
    """The projected embeddings: transformers 5 returns them as `pooler_output`, 4 as a tensor."""
    import torch

    return (output if torch.is_tensor(output) else output.pooler_output).float().cpu().numpy()
