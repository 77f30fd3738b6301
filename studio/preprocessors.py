"""Control-map preprocessors: picture in, the map a ControlNet or T2I-Adapter reads out.

Canny is OpenCV's, as the ControlNet authors used; the rest come from controlnet-aux.
Those that need no weights work offline: canny, content shuffle, standard lineart, the toy
world's palette segmentation and "none" (the upload already is a map). Those that do need
the annotator weights that lllyasviel/Annotators publishes; those are pickles, and the
studio loads safetensors only, so each is converted once, on the user's say-so, with
`python -m studio convert-annotator FILE.pth` (torch.load(weights_only=True), which refuses
code) into the annotator folder (`LATENT_STUDIO_ANNOTATORS`, default `models/annotators`).
Depth Anything and the UperNet ADE20k segmenter are transformers models, published as
safetensors: each is read from a folder named after its hub repo in the annotator folder, or
from the Hugging Face cache. A missing file is named, with where it comes from and where it goes.

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
    weights: tuple[str, ...] = ()  # published pickle files in lllyasviel/Annotators it always reads
    weights_a: tuple[str, ...] = ()  # those it reads only while threshold a is on (OpenPose's hands)
    weights_b: tuple[str, ...] = ()  # those it reads only while threshold b is on (OpenPose's face)
    hub: str | None = None  # a transformers model (safetensors) it reads, by hub repo
    package: str | None = None  # an optional Python package it needs

    def needed(self, a=None, b=None) -> tuple[str, ...]:
        """The published annotator files a run with thresholds `a` and `b` reads."""
        return self.weights + (self.weights_a if a else ()) + (self.weights_b if b else ())


def converted(published: str) -> str:
    """The safetensors name `convert-annotator` gives a published pickle."""
    return Path(published).stem + ".safetensors"


HUB_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


def hub_folder(repo: str) -> Path | None:
    """The folder holding a transformers model's HUB_FILES: `<annotators>/<repo name>`, else the
    Hugging Face cache's snapshot of `repo`; None when neither has them all."""
    folder = annotator_dir() / repo.split("/")[-1]
    if all((folder / name).is_file() for name in HUB_FILES):
        return folder
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(repo, name) for name in HUB_FILES]
    if all(isinstance(path, str) for path in cached):
        return Path(cached[0]).parent
    return None


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


def _load(module, folder: Path, file: str, remap=None):
    """`module` with the tensors of `folder/file`, float, in eval mode. `remap(module, tensors)`
    renames the published keys to the module's (controlnet_aux's own function, where it has one)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / file))
    try:
        module.load_state_dict(remap(module, tensors) if remap else tensors)
    except (KeyError, RuntimeError):
        raise ModelError(
            f"{file} in {folder} does not fit controlnet_aux's {type(module).__name__} network: "
            "convert the published file of that name again"
        ) from None
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


def _midas(folder: Path):
    """MiDaS v3 DPT-Hybrid (Ranftl et al., "Vision Transformers for Dense Prediction", ICCV 2021):
    controlnet_aux's detector around the network built here (timm, no pretrained download)."""
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    return MidasDetector(_load(net, folder, "dpt_hybrid-midas-501f0c75.safetensors"))


def _depth_midas(image, _a, _b, folder):
    """Relative inverse depth, min-max scaled to 0..255."""
    side = min(image.size)
    return _midas(folder)(image, detect_resolution=side, image_resolution=side)


def _normal_midas(image, background, _b, folder):
    """Normals from the Sobel gradients of MiDaS depth (ControlNet 1.0's normal map): pixels
    nearer than `background` (relative depth) keep them, the rest face the viewer."""
    side = min(image.size)
    _, normal = _midas(folder)(
        image, bg_th=background, depth_and_normal=True, detect_resolution=side, image_resolution=side
    )
    return normal


def _depth_anything(image, _a, _b, folder):
    """Depth Anything (Yang et al., "Depth Anything: Unleashing the Power of Large-Scale Unlabeled
    Data", CVPR 2024) through transformers, at the image's size, min-max scaled to 0..255 as
    transformers' depth-estimation pipeline does."""
    import torch
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    source = hub_folder(DEPTH_ANYTHING_REPO)
    processor = AutoImageProcessor.from_pretrained(source)
    model = DepthAnythingForDepthEstimation.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():  # from_pretrained returns the model in eval mode
        outputs = model(**processor(images=image, return_tensors="pt"))
    depth = processor.post_process_depth_estimation(outputs, [image.size[::-1]])[0]["predicted_depth"].numpy()
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    return Image.fromarray((depth * 255).astype("uint8"))


def _normal_bae(image, _a, _b, folder):
    """Surface normals with aleatoric uncertainty (Bae et al., "Estimating and Exploiting the
    Aleatoric Uncertainty in Surface Normal Estimation", ICCV 2021), ScanNet weights."""
    import contextlib
    import io
    import types

    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    args = types.SimpleNamespace(  # NormalBaeDetector.from_pretrained's
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its EfficientNet encoder prints as it is built
        net = NNET(args)
    side = min(image.size)
    return NormalBaeDetector(_load(net, folder, "scannet.safetensors"))(
        image, detect_resolution=side, image_resolution=side
    )


def _estimator(cls, net, **attributes):
    """controlnet_aux's Body / Hand / Face around a network loaded here: their constructors
    torch.load a pickle, so they are skipped and the attributes they set are set instead."""
    estimator = cls.__new__(cls)
    vars(estimator).update(model=net, **attributes)
    return estimator


def openpose_detector(folder: Path, hands: bool, face: bool):
    """controlnet_aux's OpenposeDetector with the body network and, when asked for, the hand and
    face networks."""
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face, FaceNet, params
    from controlnet_aux.open_pose.hand import Hand
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model
    from controlnet_aux.open_pose.util import transfer

    body = _estimator(Body, _load(bodypose_model(), folder, "body_pose_model.safetensors", transfer))
    hand = face_estimator = None
    if hands:
        hand = _estimator(Hand, _load(handpose_model(), folder, "hand_pose_model.safetensors", transfer))
    if face:
        face_estimator = _estimator(
            Face,
            _load(FaceNet(), folder, "facenet.safetensors"),
            inference_size=params["inference_img_size"],
            sigma=params["gaussian_sigma"],
            threshold=params["heatmap_peak_thresh"],
        )
    return OpenposeDetector(body, hand, face_estimator)


def _openpose(image, hands, face, folder):
    """OpenPose (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity Fields",
    CVPR 2017) body keypoints, with Simon et al.'s hand keypoints (CVPR 2017) and the face
    landmarks when asked for: A1111's openpose, openpose_hand, openpose_face and openpose_full."""
    side = min(image.size)
    return openpose_detector(folder, bool(hands), bool(face))(
        image,
        include_hand=bool(hands),
        include_face=bool(face),
        detect_resolution=side,
        image_resolution=side,
    )


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


def _upernet(image, _a, _b, folder):
    """ADE20k semantic segmentation by UperNet (Xiao et al., "Unified Perceptual Parsing for Scene
    Understanding", ECCV 2018) on ConvNeXt through transformers: each pixel painted with the
    ADE20k palette colour of its class, the map ControlNet 1.1's seg model reads (UniFormer's,
    whose head is UperNet too). The palette is controlnet_aux.util.ade_palette, mmsegmentation's
    ADE20KDataset.PALETTE that lllyasviel's UniFormer annotator paints with (get_palette('ade')).
    ConvNeXt-T because its hub repo has model.safetensors on main (-small's and OneFormer's
    shi-labs/oneformer_ade20k_swin_tiny have pickles there, safetensors only in bot PRs)."""
    import torch
    from controlnet_aux.util import ade_palette
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    source = hub_folder(UPERNET_REPO)
    processor = AutoImageProcessor.from_pretrained(source)
    model = UperNetForSemanticSegmentation.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    palette = np.array(ade_palette(), dtype=np.uint8)
    if model.config.num_labels != len(palette):
        raise ModelError(f"{source} has {model.config.num_labels} classes, not ADE20k's {len(palette)}")
    with torch.no_grad():  # from_pretrained returns the model in eval mode
        outputs = model(**processor(images=image, return_tensors="pt"))
    classes = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    return Image.fromarray(palette[classes.numpy()])


def _uniformer(image, a, b, folder):
    """UniFormer (Li et al., ICLR 2022) ADE20k segmentation, ControlNet 1.0's seg annotator: not
    in controlnet-aux, so refused with what it would need and what to use instead."""
    raise ModelError(
        "the segmentation (UniFormer, ADE20k) preprocessor can't run: controlnet-aux 0.0.10 has no "
        "UniFormer detector, and lllyasviel's needs the mmcv-full and mmsegmentation packages, which "
        f"are not installed; use the {UPERNET} preprocessor (the same ADE20k palette, from {UPERNET_REPO})"
    )


DEPTH_ANYTHING_REPO = "LiheYoung/depth-anything-small-hf"
UPERNET, UPERNET_REPO = "segmentation_ade20k_upernet", "openmmlab/upernet-convnext-tiny"
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
        Preprocessor("depth_midas", "depth (MiDaS)", _depth_midas, weights=("dpt_hybrid-midas-501f0c75.pt",)),
        Preprocessor(
            "normal_midas",
            "normals (from MiDaS depth)",
            _normal_midas,
            Threshold("background threshold", 0.4, 0.0, 1.0),
            weights=("dpt_hybrid-midas-501f0c75.pt",),
        ),
        Preprocessor("depth_anything", "depth (Depth Anything)", _depth_anything, hub=DEPTH_ANYTHING_REPO),
        Preprocessor("normal_bae", "normals (BAE)", _normal_bae, weights=("scannet.pt",)),
        Preprocessor(
            "openpose",
            "pose (OpenPose)",
            _openpose,
            Threshold("include hands (0/1)", 0, 0, 1),
            Threshold("include face (0/1)", 0, 0, 1),
            weights=("body_pose_model.pth",),
            weights_a=("hand_pose_model.pth",),
            weights_b=("facenet.pth",),
        ),
        Preprocessor(UPERNET, "segmentation (UperNet ConvNeXt-T, ADE20k)", _upernet, hub=UPERNET_REPO),
        Preprocessor("segmentation_ade20k", "segmentation (UniFormer, ADE20k)", _uniformer),
    )
}


def get(name: str) -> Preprocessor:
    if name not in PREPROCESSORS:
        raise SettingsError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name]


def check_available(p: Preprocessor, a=None, b=None) -> None:
    """Refuse, naming what is missing and where it goes, when weights or a package are absent."""
    if p.package:
        import importlib.util

        if importlib.util.find_spec(p.package) is None:
            raise ModelError(
                f"the {p.label} preprocessor needs the {p.package} package: pip install {p.package}"
            )
    folder = annotator_dir()
    for published in p.needed(a, b):
        if not (folder / converted(published)).is_file():
            raise ModelError(
                f"the {p.label} preprocessor needs {converted(published)} in {folder}: download "
                f"{published} from the hub repo {ANNOTATORS_REPO} and convert it with "
                f"`python -m studio convert-annotator {published}`"
            )
    if p.hub and hub_folder(p.hub) is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        local = folder / p.hub.split("/")[-1]
        raise ModelError(
            f"the {p.label} preprocessor needs the hub model {p.hub} "
            f"({', '.join(name for name in HUB_FILES if not (local / name).is_file())} missing in {local}, "
            f"and not in the Hugging Face cache {HF_HUB_CACHE}): `hf download {p.hub} --local-dir {local}`"
        )


def preprocess(name: str, image: Image.Image, resolution: int | None = None, a=None, b=None) -> Image.Image:
    """The control map of `image` (RGB, at the image's size)."""
    p = get(name)
    check_int("preprocessor resolution", resolution, 64, 2048)
    a = p.a.default if a is None and p.a else a
    b = p.b.default if b is None and p.b else b
    for threshold, value in ((p.a, a), (p.b, b)):
        if threshold and not threshold.lo <= value <= threshold.hi:
            raise SettingsError(
                f"{p.label}: {threshold.label} must be between {threshold.lo:g} and {threshold.hi:g}"
            )
    check_available(p, a, b)
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
    for key in ("state_dict", "model"):  # PiDiNet's and BAE's (scannet.pt) training checkpoints
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{source.name} is not a plain state dict of tensors")
    tensors = {k.removeprefix("module."): v.contiguous() for k, v in data.items()}
    folder = folder or annotator_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (source.stem + ".safetensors")
    save_file(tensors, str(target))
    return target
