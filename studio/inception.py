"""FID's own feature space: Inception-V3 pool3 features as torch-fidelity computes them.

Heusel et al.'s FID (NeurIPS 2017) is defined over the 2,048 pool3 activations of the
TensorFlow Inception-V3 graph of 2015-12-05. torch-fidelity (Obukhov et al., 0.4.0) ports that
graph (`FeatureExtractorInceptionV3`, weights `weights-inception-2015-12-05-6726825d.pth`, the
same file pytorch-fid ships as `pt_inception-2015-12-05-6726825d.pth`) and resizes every picture
to 299 × 299 inside the network with TensorFlow 1.x's bilinear interpolation (no antialiasing),
as the original TF code did; clean-fid's PIL-bicubic resize gives other numbers, so the resize
is named with every FID. Pixels go in as uint8 RGB, scaled to [-1, 1] by the network.

Its published weights are a pickle: `convert_inception` reads them once with
torch.load(weights_only=True) and writes safetensors into the studio's metrics folder
(`python -m studio convert-inception FILE.pth`); the studio only ever reads the safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .models import ModelError

WEIGHTS_NAME = "inception-v3-fid.safetensors"
RESIZE = "torch-fidelity's TensorFlow-1.x-compatible bilinear resize to 299×299"
SPACE = f"Inception-V3 pool3 (2048) features (torch-fidelity 0.4.0 conventions, {RESIZE})"


def build(state_dict: dict):
    """torch-fidelity's FeatureExtractorInceptionV3 ("2048" features) holding `state_dict`.

    Its constructor fetches its weights itself (a download, or a pickle given as a path); the
    fetch is pointed at the tensors already read from safetensors for the construction."""
    from torch_fidelity import feature_extractor_inceptionv3 as port

    fetch = port.load_state_dict_from_url
    port.load_state_dict_from_url = lambda *_args, **_kwargs: state_dict
    try:
        return port.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        port.load_state_dict_from_url = fetch


class InceptionEmbedder:
    """Inception-V3 pool3 features of pictures (rows), from the converted safetensors file."""

    space = SPACE

    def __init__(self, path: Path, device: str = "cpu"):
        from safetensors.torch import load_file

        try:
            self.model = build(load_file(str(path))).to(device)
        except RuntimeError as exc:  # load_state_dict: missing or unexpected tensors
            raise ModelError(
                f"{path} does not hold the FID Inception-V3 weights ({str(exc).splitlines()[0]})"
            ) from None
        self.device = device
        self.key = (str(path), path.stat().st_mtime_ns)  # reference features are cached by it

    def image_features(self, images, batch: int = 32) -> np.ndarray:
        """One row per picture, in order; pictures of one size go through together."""
        import torch

        tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]
        out: list = [None] * len(tensors)
        by_size: dict = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape), []).append(i)
        with torch.no_grad():
            for indices in by_size.values():
                for start in range(0, len(indices), batch):
                    chunk = indices[start : start + batch]
                    (features,) = self.model(torch.stack([tensors[i] for i in chunk]).to(self.device))
                    for i, row in zip(chunk, features.cpu().numpy(), strict=True):
                        out[i] = row
        return np.stack(out)


def convert_inception(source: Path, target: Path) -> Path:
    """The published FID Inception pickle as safetensors at `target`, read with
    torch.load(weights_only=True): no code in the file runs. The tensors are checked against
    the network before anything is written."""
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
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{source.name} is not a plain state dict of tensors")
    try:
        build(data)
    except RuntimeError as exc:
        raise ModelError(
            f"{source.name} is not the FID Inception-V3 (pt_inception-2015-12-05) weights "
            f"({str(exc).splitlines()[0]})"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in data.items()}, str(target))
    return target
