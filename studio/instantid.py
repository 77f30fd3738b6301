"""InstantID: identity-preserving SDXL generation from one face picture.

Wang et al., "InstantID: Zero-shot Identity-Preserving Generation in Seconds" (2024). A
face analyser (insightface's antelopev2: detector + ArcFace recogniser) gives the face's
identity embedding (512-d) and five keypoints. Three parts use them, as the paper wires
them (§3.2–3.3):
1. The embedding, through a Resampler projection (the identity adapter, IP-Adapter-Plus
   layout), becomes 16 image tokens read by decoupled cross-attention in the SDXL UNet
   (IP-Adapter's eq. 5, scale = `identity_scale`).
2. IdentityNet, a ControlNet, takes the keypoints drawn as a picture as its spatial
   condition and — instead of the text — the SAME identity tokens as its cross-attention
   context (scale = `keypoint_scale`).
3. Classifier-free guidance drops the text and the identity (a zero embedding) together.
The published files: `antelopev2/` (the insightface model folder), `ControlNetModel/` (the
IdentityNet, from InstantX/InstantID) and the identity adapter `ip-adapter.bin`, a pickle:
`python -m studio convert-ip-adapter ip-adapter.bin` converts it once (weights only) to the
`ip-adapter.safetensors` that the studio loads. They live in `models/instantid/` (or
`LATENT_STUDIO_INSTANTID`); a missing one is named with where it comes from.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .models import REPO_ROOT, ModelError, ModelManager
from .progress import StepInfo, step_callback
from .result import Result
from .schedulers import make_scheduler
from .settings import SettingsError, check_float, check_int
from .txt2img import Txt2ImgSettings, family_arguments, prompt_arguments
from .txt2img import resolve as resolve_txt2img

FACE_TECHNIQUE = "face"  # the gallery technique of a stored face picture
ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")  # the detector and the recogniser we use
KEYPOINT_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def instantid_dir() -> Path:
    return Path(os.environ.get("LATENT_STUDIO_INSTANTID") or REPO_ROOT / "models" / "instantid")


@dataclass(frozen=True)
class InstantIDSettings(Txt2ImgSettings):
    technique = "instantid"
    schema_version = 1

    model: str = "sdxl-base"
    identity_scale: float = 0.8  # the identity adapter's λ
    keypoint_scale: float = 0.8  # IdentityNet's conditioning scale
    face_id: int | None = None  # the gallery item holding the face picture (set once stored)

    def __post_init__(self):
        super().__post_init__()
        check_float("identity scale", self.identity_scale, 0.0, 2.0)
        check_float("keypoint scale", self.keypoint_scale, 0.0, 2.0)
        check_int("face id", self.face_id, 1, 2**63 - 1)
        if self.refiner:
            raise SettingsError("InstantID runs the SDXL base model alone; leave the refiner out")


@dataclass(frozen=True)
class Face:
    embedding: object  # (512,) float array: the identity
    keypoints: object  # (5, 2): eyes, nose, mouth corners, in pixels
    box: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def files(folder: Path | None = None, *, faces: bool = True) -> dict[str, Path]:
    """The InstantID files in `folder`; a ModelError naming each missing one and its source."""
    folder = folder or instantid_dir()
    found = {
        "antelopev2": folder / "antelopev2",
        "controlnet": folder / "ControlNetModel",
        "adapter": folder / "ip-adapter.safetensors",
    }
    missing = []
    if faces and not all((found["antelopev2"] / f).is_file() for f in ANTELOPE_FILES):
        missing.append(
            f"{found['antelopev2']}/ (insightface's antelopev2 models, {', '.join(ANTELOPE_FILES)} among them: "
            "unzip antelopev2.zip from the insightface model releases there, without its inner folder)"
        )
    if not (found["controlnet"] / "config.json").is_file() or not any(
        found["controlnet"].glob("*.safetensors")
    ):
        missing.append(
            f"{found['controlnet']}/ (IdentityNet: config.json and diffusion_pytorch_model.safetensors from "
            "InstantX/InstantID's ControlNetModel folder: `hf download InstantX/InstantID --include "
            f"'ControlNetModel/*' --local-dir {folder}`)"
        )
    if not found["adapter"].is_file():
        pickle = folder / "ip-adapter.bin"
        how = (
            f"convert the {pickle.name} there once with `python -m studio convert-ip-adapter {pickle}` "
            "(weights only; the studio never loads pickles when generating)"
            if pickle.is_file()
            else "download ip-adapter.bin from InstantX/InstantID into that folder, then convert it with "
            f"`python -m studio convert-ip-adapter {pickle}`"
        )
        missing.append(f"{found['adapter']} (the identity adapter: {how})")
    if missing:
        raise ModelError("InstantID needs files that are not on this machine: " + "; ".join(missing))
    return found


class InsightFaceAnalyser:
    """insightface's FaceAnalysis on a local antelopev2 folder (never downloads)."""

    def __init__(self, folder: Path, device: str = "cpu"):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise ModelError(
                "InstantID's face analysis needs the insightface and onnxruntime packages: "
                "`pip install insightface onnxruntime`"
            ) from None
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        # a `name` that is an existing folder is used as it is
        self.app = FaceAnalysis(name=str(folder), root=str(folder.parent), providers=providers)
        self.app.prepare(ctx_id=0 if device == "cuda" else -1, det_size=(640, 640))

    def __call__(self, image) -> list[Face]:
        import numpy as np

        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        return [Face(f["embedding"], f["kps"], tuple(float(v) for v in f["bbox"])) for f in self.app.get(bgr)]


def draw_keypoints(size: tuple[int, int], keypoints) -> object:
    """The IdentityNet condition, drawn as InstantID's `draw_kps`: the four limbs from the
    nose to each eye and mouth corner as coloured ellipses, the five points as dots, black
    background."""
    import cv2
    import numpy as np
    from PIL import Image

    points = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    width = max(2, round(min(size) / 100))
    for a, b in ((0, 2), (1, 2), (3, 2), (4, 2)):
        (x0, y0), (x1, y1) = points[a], points[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        polygon = cv2.ellipse2Poly(
            (int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), width), int(angle), 0, 360, 1
        )
        canvas = cv2.fillConvexPoly(canvas.copy(), polygon, KEYPOINT_COLORS[a])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), color in zip(points, KEYPOINT_COLORS, strict=True):
        canvas = cv2.circle(canvas.copy(), (int(x), int(y)), 2 * width, color, -1)
    return Image.fromarray(canvas)


def fit_face(face_image, size: tuple[int, int]):
    """The face picture fitted to the output size (centre crop, resize), so keypoints land in place."""
    from PIL import Image, ImageOps

    return ImageOps.fit(face_image.convert("RGB"), size, Image.Resampling.LANCZOS)


def run(
    settings: InstantIDSettings,
    face_image,
    models: ModelManager,
    *,
    analyser: Callable | None = None,
    folder: Path | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Result:
    """Generate the face's identity as `settings.prompt` says. `analyser(picture) -> [Face]`
    defaults to insightface on `folder/antelopev2`."""
    import torch

    # 1. Settings, family and files: SDXL only; every missing file named before anything loads.
    s, family = resolve_txt2img(settings, models)
    if family not in ("sdxl", "unknown"):
        raise SettingsError(f"InstantID is for SDXL models; {s.model} is {family}")
    found = files(folder, faces=analyser is None)
    size = (s.width or 1024, s.height or 1024)
    s = s.replace(width=size[0], height=size[1])
    # 2. The face: the largest one the analyser finds in the fitted picture.
    picture = fit_face(face_image, size)
    analyser = analyser or InsightFaceAnalyser(found["antelopev2"], models.device)
    faces = analyser(picture)
    if not faces:
        raise SettingsError(
            "no face was found in the picture: InstantID needs a photo with a clearly visible face "
            "(front or three-quarter view, not too small)"
        )
    face = max(faces, key=lambda f: f.area)
    keypoint_map = draw_keypoints(size, face.keypoints)
    started = time.perf_counter()
    with models.lend(
        s.model,
        "controlnet",
        loras=s.loras,
        controls=(str(found["controlnet"]),),
        ip_adapters=(str(found["adapter"]),),
    ) as pipe:
        result = Result(settings=s, family=family if family != "unknown" else "sdxl")
        pipe.scheduler = make_scheduler(s.scheduler, result.family, pipe.scheduler.config)
        pipe.set_ip_adapter_scale(s.identity_scale)
        # 3. The identity embedding, the zero embedding first for guidance's unconditional branch.
        unet = pipe.unet
        identity = torch.as_tensor(face.embedding, dtype=unet.dtype, device=unet.device).reshape(1, 1, 1, -1)
        guided = s.guidance > 1
        embeds = torch.cat([torch.zeros_like(identity), identity]) if guided else identity
        # 4. IdentityNet reads the identity tokens, not the text, as its cross-attention context.
        with torch.no_grad():
            tokens = unet.encoder_hid_proj([embeds])[0].flatten(1, 2)  # (1 or 2, 16, width)
        hook = pipe.controlnet.register_forward_pre_hook(_identity_context(tokens, guided), with_kwargs=True)
        try:
            for batch in range(s.batch_count):
                seeds = [s.seed + batch * s.batch_size + i for i in range(s.batch_size)]
                generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
                output = pipe(
                    **prompt_arguments(pipe, result.family, s),
                    image=keypoint_map,
                    controlnet_conditioning_scale=s.keypoint_scale,
                    ip_adapter_image_embeds=[embeds],
                    num_inference_steps=s.steps,
                    guidance_scale=s.guidance,
                    width=s.width,
                    height=s.height,
                    num_images_per_prompt=s.batch_size,
                    generator=generators,
                    callback_on_step_end=step_callback(on_step, s.steps, batch, s.batch_count),
                    **family_arguments(result.family, s),
                )
                result.images += list(output.images)
                result.seeds += seeds
        finally:
            hook.remove()
    result.figures = {"face": picture, "face keypoints": keypoint_map}
    result.duration_s = time.perf_counter() - started
    return result


def _identity_context(tokens, guided: bool):
    """A ControlNet pre-hook giving it the identity tokens as `encoder_hidden_states`, batched
    like the latents it gets ([uncond × n, cond × n] with guidance, the cond half in guess mode)."""

    def hook(_module, args, kwargs):
        batch = (args[0] if args else kwargs["sample"]).shape[0]
        if guided and batch % 2 == 0 and batch >= 2 and tokens.shape[0] == 2:
            context = tokens.repeat_interleave(batch // 2, dim=0)
        else:
            context = tokens[-1:].expand(batch, -1, -1)
        return args, {**kwargs, "encoder_hidden_states": context.to(kwargs["encoder_hidden_states"].dtype)}

    return hook


def convert_ip_adapter(source: Path, target: Path | None = None) -> Path:
    """A published IP-Adapter pickle (`{"image_proj": {...}, "ip_adapter": {...}}`, as InstantID's
    ip-adapter.bin and h94's .bin files) as safetensors in load_ip_adapter's flat layout, read
    with torch.load(weights_only=True): no code in the file runs. Done once, on the user's word."""
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
    if not isinstance(data, dict) or not {"image_proj", "ip_adapter"} <= set(data):
        raise ModelError(f"{source.name} is not an IP-Adapter checkpoint (no image_proj / ip_adapter parts)")
    tensors = {}
    for group in ("image_proj", "ip_adapter"):
        if not isinstance(data[group], dict) or not all(
            isinstance(v, torch.Tensor) for v in data[group].values()
        ):
            raise ModelError(f"{source.name}: its {group} part is not a plain dict of tensors")
        tensors.update({f"{group}.{k}": v.contiguous() for k, v in data[group].items()})
    target = target or source.with_suffix(".safetensors")
    save_file(tensors, str(target))
    return target
