"""Control-map preprocessors: picture in, the map a ControlNet or T2I-Adapter reads out.

Canny is OpenCV's, as the ControlNet authors used; the rest come from controlnet-aux.
Those that need no weights work offline: canny, content shuffle, standard lineart, the toy
world's palette segmentation and "none" (the upload already is a map). Those that do need
the annotator weights that lllyasviel/Annotators publishes; those are pickles, and the
studio loads safetensors only, so each is converted once, on the user's say-so, with
`python -m studio convert-annotator FILE.pth` (torch.load(weights_only=True), which refuses
code) into the annotator folder (`LATENT_STUDIO_ANNOTATORS`, default `models/annotators`).
A missing file is named, with where it comes from and where it goes.

Every map comes back at the input's size. `resolution` is the side the detector works at
(the input's shorter side scaled to it, as A1111's "preprocessor resolution"); `a` and
`b` are each preprocessor's two thresholds (A1111's threshold_a / threshold_b).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .models import REPO_ROOT, ModelError
from .settings import SettingsError, check_int

ANNOTATORS_REPO = "lllyasviel/Annotators"


def annotator_dir() -> Path:
    return Path(os.environ.get("LATENT_STUDIO_ANNOTATORS") or REPO_ROOT / "models" / "annotators")


@dataclass(frozen=True)
class Threshold:
    label: str
    default: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    run: Callable  # (image at working size, a, b, weights folder) -> map
    a: Threshold | None = None
    b: Threshold | None = None
    weights: tuple[str, ...] = ()  # published pickle files in lllyasviel/Annotators
    package: str | None = None  # an optional Python package it needs

    def safetensors_files(self) -> list[str]:
        return [Path(name).stem + ".safetensors" for name in self.weights]


# --------------------------------------------------------------------------- the detectors


def _none(image, a, b, folder):
    return image


def _canny(image, low, high, folder):
    import cv2

    gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, int(low), int(high))
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _palette_segmentation(image, a, b, folder):
    """The toy world's segmentation: each pixel its nearest object colour, background black."""
    from .toyworld.world import BACKGROUNDS, COLORS

    names = [*BACKGROUNDS, *COLORS]
    table = np.array([*BACKGROUNDS.values(), *COLORS.values()], dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32)
    nearest = ((pixels[..., None, :] - table) ** 2).sum(-1).argmin(-1)
    paint = np.array([(0, 0, 0)] * len(BACKGROUNDS) + list(COLORS.values()), dtype=np.uint8)
    assert len(paint) == len(names)
    return Image.fromarray(paint[nearest])


def _shuffle(image, a, b, folder):
    from controlnet_aux import ContentShuffleDetector

    state = np.random.get_state()
    np.random.seed(int(a))  # the shuffle is random: its seed is the first threshold
    try:
        side = min(image.size)
        return ContentShuffleDetector()(image, detect_resolution=side, image_resolution=side)
    finally:
        np.random.set_state(state)


def _lineart_standard(image, sigma, threshold, folder):
    from controlnet_aux import LineartStandardDetector

    return LineartStandardDetector()(
        image, guassian_sigma=sigma, intensity_threshold=int(threshold), detect_resolution=min(image.size)
    )


def _load(module, folder: Path, file: str):
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(folder / file)))
    return module.float().eval()


def _hed(image, safe, _b, folder):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    net = _load(ControlNetHED_Apache2(), folder, "ControlNetHED.safetensors")
    side = min(image.size)
    return HEDdetector(net)(image, detect_resolution=side, image_resolution=side, safe=bool(safe))


def _pidinet(image, safe, _b, folder):
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet

    net = _load(pidinet(), folder, "table5_pidinet.safetensors")
    side = min(image.size)
    return PidiNetDetector(net)(image, detect_resolution=side, image_resolution=side, safe=bool(safe))


def _lineart(image, coarse, _b, folder):
    from controlnet_aux.lineart import Generator, LineartDetector

    fine = _load(Generator(3, 1, 3), folder, "sk_model.safetensors")
    rough = _load(Generator(3, 1, 3), folder, "sk_model2.safetensors")
    side = min(image.size)
    return LineartDetector(fine, rough)(
        image, coarse=bool(coarse), detect_resolution=side, image_resolution=side
    )


def _mlsd(image, thr_v, thr_d, folder):
    from controlnet_aux.mlsd import MLSDdetector
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    net = _load(MobileV2_MLSD_Large(), folder, "mlsd_large_512_fp32.safetensors")
    side = min(image.size)
    return MLSDdetector(net)(image, thr_v=thr_v, thr_d=thr_d, detect_resolution=side, image_resolution=side)


def _mediapipe_face(image, max_faces, confidence, folder):
    from controlnet_aux import MediapipeFaceDetector

    side = min(image.size)
    return MediapipeFaceDetector()(
        image,
        max_faces=int(max_faces),
        min_confidence=confidence,
        detect_resolution=side,
        image_resolution=side,
    )


def _not_wired(image, a, b, folder):
    raise SettingsError(
        "this preprocessor's network isn't wired to safetensors weights yet; use a map you made"
    )


SAFE = Threshold("safe steps (0/1)", 0, 0, 1)
PREPROCESSORS = {
    p.name: p
    for p in (
        Preprocessor("none", "none (the image is the map)", _none),
        Preprocessor(
            "canny",
            "Canny edges (OpenCV)",
            _canny,
            Threshold("low threshold", 100, 1, 255),
            Threshold("high threshold", 200, 1, 255),
        ),
        Preprocessor("segmentation_palette", "segmentation (toy-world palette)", _palette_segmentation),
        Preprocessor("shuffle", "content shuffle", _shuffle, Threshold("seed", 0, 0, 2**31 - 1)),
        Preprocessor(
            "lineart_standard",
            "lineart (standard, no weights)",
            _lineart_standard,
            Threshold("gaussian sigma", 6.0, 0.1, 32.0),
            Threshold("intensity threshold", 8, 0, 255),
        ),
        Preprocessor("hed", "soft edge (HED)", _hed, SAFE, weights=("ControlNetHED.pth",)),
        Preprocessor("pidinet", "soft edge (PiDiNet)", _pidinet, SAFE, weights=("table5_pidinet.pth",)),
        Preprocessor(
            "lineart",
            "lineart",
            _lineart,
            Threshold("coarse (0/1)", 0, 0, 1),
            weights=("sk_model.pth", "sk_model2.pth"),
        ),
        Preprocessor(
            "mlsd",
            "straight lines (M-LSD)",
            _mlsd,
            Threshold("value threshold", 0.1, 0.01, 2.0),
            Threshold("distance threshold", 0.1, 0.01, 20.0),
            weights=("mlsd_large_512_fp32.pth",),
        ),
        Preprocessor(
            "mediapipe_face",
            "face mesh (MediaPipe)",
            _mediapipe_face,
            Threshold("max faces", 1, 1, 10),
            Threshold("min confidence", 0.5, 0.1, 1.0),
            package="mediapipe",
        ),
        Preprocessor("depth_midas", "depth (MiDaS)", _not_wired, weights=("dpt_hybrid-midas-501f0c75.pt",)),
        Preprocessor("normal_bae", "normals (BAE)", _not_wired, weights=("scannet.pt",)),
        Preprocessor(
            "openpose",
            "pose (OpenPose)",
            _not_wired,
            weights=("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
        ),
        Preprocessor(
            "segmentation_ade20k",
            "segmentation (UniFormer, ADE20k)",
            _not_wired,
            weights=("upernet_global_small.pth",),
        ),
    )
}


def get(name: str) -> Preprocessor:
    if name not in PREPROCESSORS:
        raise SettingsError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name]


def check_available(p: Preprocessor) -> None:
    """Refuse, naming what is missing and where it goes, when weights or a package are absent."""
    if p.package:
        import importlib.util

        if importlib.util.find_spec(p.package) is None:
            raise ModelError(
                f"the {p.label} preprocessor needs the {p.package} package: pip install {p.package}"
            )
    folder = annotator_dir()
    for published, local in zip(p.weights, p.safetensors_files(), strict=True):
        if not (folder / local).is_file():
            raise ModelError(
                f"the {p.label} preprocessor needs {local} in {folder}: download {published} from the hub "
                f"repo {ANNOTATORS_REPO} and convert it with `python -m studio convert-annotator {published}`"
            )


def preprocess(name: str, image: Image.Image, resolution: int | None = None, a=None, b=None) -> Image.Image:
    """The control map of `image` (RGB, at the image's size)."""
    p = get(name)
    check_int("preprocessor resolution", resolution, 64, 2048)
    check_available(p)
    a = p.a.default if a is None and p.a else a
    b = p.b.default if b is None and p.b else b
    for threshold, value in ((p.a, a), (p.b, b)):
        if threshold and not threshold.lo <= value <= threshold.hi:
            raise SettingsError(
                f"{p.label}: {threshold.label} must be between {threshold.lo:g} and {threshold.hi:g}"
            )
    image = image.convert("RGB")
    working = image
    if resolution and resolution != min(image.size):
        scale = resolution / min(image.size)
        working = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
        )
    result = p.run(working, a, b, annotator_dir()).convert("RGB")
    if result.size != image.size:
        result = result.resize(image.size, Image.Resampling.NEAREST)
    return result


def convert_annotator(source: Path, folder: Path | None = None) -> Path:
    """A published annotator pickle as safetensors, read with weights_only=True (no code runs)."""
    import torch
    from safetensors.torch import save_file

    try:
        data = torch.load(str(source), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{source.name} could not be read as plain tensors ({str(exc).splitlines()[0]})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # PiDiNet's training checkpoint
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{source.name} is not a plain state dict of tensors")
    tensors = {k.removeprefix("module."): v.contiguous() for k, v in data.items()}
    folder = folder or annotator_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (source.stem + ".safetensors")
    save_file(tensors, str(target))
    return target
