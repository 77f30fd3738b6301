"""Preprocessors that read annotator weights: controlnet_aux's own networks with seeded random
weights, saved under the published file names and layouts, converted to safetensors as a user
would, and each map checked against controlnet_aux's detector (or transformers' pipeline) on
the same weights and picture, at the picture's size; and the refusals that name a missing file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from studio import preprocessors
from studio.models import ModelError


@pytest.fixture
def annotators(tmp_path, monkeypatch):
    folder = tmp_path / "annotators"
    monkeypatch.setenv("LATENT_STUDIO_ANNOTATORS", str(folder))
    return folder


@pytest.fixture(scope="module")
def picture():
    """A smooth, non-square picture (80×64): blurred seeded noise."""
    noise = np.random.RandomState(0).randint(0, 256, (16, 20, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((80, 64), Image.Resampling.BICUBIC)


def publish(folder, name: str, state: dict) -> None:
    """`state` saved as the published pickle `name` in `folder`, converted into the annotator folder."""
    torch.save(state, folder / name)
    preprocessors.convert_annotator(folder / name)


def reference(detector, picture, **kwargs) -> np.ndarray:
    """controlnet_aux's map at the detector's working side, brought to the picture's size as the studio does."""
    side = min(picture.size)
    out = detector(picture, detect_resolution=side, image_resolution=side, **kwargs)
    if isinstance(out, tuple):  # MiDaS's depth and normals
        out = out[1]
    return pixels(out.convert("RGB").resize(picture.size, Image.Resampling.NEAREST))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def studio_map(name, picture, **thresholds) -> np.ndarray:
    result = preprocessors.preprocess(name, picture, **thresholds)
    assert result.size == picture.size
    return pixels(result)


@pytest.mark.slow
def test_midas_depth_and_normals_match_controlnet_aux(tmp_path, annotators, picture):
    """The real DPT-Hybrid (123 M parameters: its config has no smaller form)."""
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    publish(
        tmp_path,
        "dpt_hybrid-midas-501f0c75.pt",
        DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).state_dict(),
    )
    detector = MidasDetector.from_pretrained(str(tmp_path))  # reads the .pth itself
    depth = studio_map("depth_midas", picture)
    side = min(picture.size)
    expected = detector(picture, detect_resolution=side, image_resolution=side)
    assert np.array_equal(depth, pixels(expected.resize(picture.size, Image.Resampling.NEAREST)))
    assert np.ptp(depth) > 0
    normals = studio_map("normal_midas", picture, a=0.3)
    assert np.array_equal(normals, reference(detector, picture, bg_th=0.3, depth_and_normal=True))


@pytest.mark.slow
def test_normal_bae_matches_controlnet_aux(tmp_path, annotators, picture):
    """scannet.pt's layout ({'model': ...}, 'module.' names), converted by the CLI."""
    import contextlib
    import io
    import types

    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    torch.manual_seed(0)
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    with contextlib.redirect_stdout(io.StringIO()):
        net = NNET(args)
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "scannet.pt")
    done = subprocess.run(
        [sys.executable, "-m", "studio", "convert-annotator", str(tmp_path / "scannet.pt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (annotators / "scannet.safetensors").is_file()
    with contextlib.redirect_stdout(io.StringIO()):
        detector = NormalBaeDetector.from_pretrained(str(tmp_path))
    normals = studio_map("normal_bae", picture)
    assert np.array_equal(normals, reference(detector, picture))
    assert np.ptp(normals) > 0


@pytest.mark.slow
def test_openpose_matches_controlnet_aux_and_loads_the_same_networks(tmp_path, annotators, picture):
    """body_pose_model.pth and hand_pose_model.pth keep the original flat names (controlnet_aux's
    `transfer` maps them), facenet.pth its module's. Random weights find no person, so the
    networks themselves are compared too."""
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(0)
    for name, net in (("body_pose_model.pth", bodypose_model()), ("hand_pose_model.pth", handpose_model())):
        publish(tmp_path, name, {k.split(".", 1)[1]: v for k, v in net.state_dict().items()})
    publish(tmp_path, "facenet.pth", FaceNet().state_dict())
    expected = OpenposeDetector.from_pretrained(str(tmp_path))
    ours = preprocessors.openpose_detector(annotators, hands=True, face=True)
    for part in ("body_estimation", "hand_estimation", "face_estimation"):
        theirs, mine = getattr(expected, part).model.state_dict(), getattr(ours, part).model.state_dict()
        assert theirs.keys() == mine.keys()
        assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    for hands, face in ((0, 0), (1, 1)):
        assert np.array_equal(
            studio_map("openpose", picture, a=hands, b=face),
            reference(expected, picture, include_hand=bool(hands), include_face=bool(face)),
        )


def test_openpose_reads_the_hand_and_face_files_only_when_asked(tmp_path, annotators, picture):
    from controlnet_aux.open_pose.model import bodypose_model

    publish(
        tmp_path,
        "body_pose_model.pth",
        {k.split(".", 1)[1]: v for k, v in bodypose_model().state_dict().items()},
    )
    assert studio_map("openpose", picture).shape == (64, 80, 3)
    with pytest.raises(
        ModelError, match=f"needs hand_pose_model.safetensors in {annotators}: download hand_pose_model.pth"
    ):
        preprocessors.preprocess("openpose", picture, a=1)
    with pytest.raises(ModelError, match="needs facenet.safetensors in .*convert-annotator facenet.pth"):
        preprocessors.preprocess("openpose", picture, b=1)


@pytest.mark.parametrize(
    "name, file",
    [
        ("depth_midas", "dpt_hybrid-midas-501f0c75"),
        ("normal_midas", "dpt_hybrid-midas-501f0c75"),
        ("normal_bae", "scannet"),
        ("openpose", "body_pose_model"),
    ],
)
def test_a_missing_annotator_file_is_named_with_its_folder(annotators, picture, name, file):
    published = preprocessors.get(name).weights[0]
    with pytest.raises(ModelError) as caught:
        preprocessors.preprocess(name, picture)
    message = str(caught.value)
    assert (
        f"needs {file}.safetensors in {annotators}: download {published} from the hub repo lllyasviel/Annotators"
        in message
    )
    assert f"python -m studio convert-annotator {published}" in message


def tiny_depth_anything(folder):
    """A random Depth Anything (DINOv2 backbone, DPT head) small enough for a test, with the image
    processor settings of LiheYoung/depth-anything-small-hf at a 56 px side."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    torch.manual_seed(0)
    backbone = Dinov2Config(
        image_size=56,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=Image.Resampling.BICUBIC,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)


def test_depth_anything_matches_the_transformers_pipeline(annotators, picture):
    from transformers import pipeline

    folder = annotators / "depth-anything-small-hf"
    tiny_depth_anything(folder)
    depth = studio_map("depth_anything", picture)
    expected = pixels(pipeline("depth-estimation", model=str(folder), device="cpu")(picture)["depth"])
    assert np.array_equal(depth, expected)
    assert np.ptp(depth) > 0


def test_depth_anything_missing_names_the_repo_and_where_it_is_looked_for(
    annotators, picture, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as caught:
        preprocessors.preprocess("depth_anything", picture)
    message = str(caught.value)
    local = annotators / "depth-anything-small-hf"
    assert "needs the hub model LiheYoung/depth-anything-small-hf" in message
    assert f"config.json, preprocessor_config.json, model.safetensors missing in {local}" in message
    assert f"not in the Hugging Face cache {tmp_path / 'hub'}" in message
    assert f"hf download LiheYoung/depth-anything-small-hf --local-dir {local}" in message


def tiny_upernet(folder, num_labels=150):
    """A random UperNet on a ConvNeXt backbone small enough for a test, with the image processor
    (Segformer's, as openmmlab/upernet-convnext-tiny's) at a 64 px side; the model and the
    processor it saved."""
    from transformers import (
        ConvNextConfig,
        SegformerImageProcessor,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    torch.manual_seed(0)
    backbone = ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = UperNetConfig(
        backbone_config=backbone, hidden_size=16, auxiliary_channels=8, num_labels=num_labels
    )
    model = UperNetForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    processor = SegformerImageProcessor(size={"height": 64, "width": 64}, do_reduce_labels=False)
    processor.save_pretrained(folder)
    return model, processor


def ade20k_map(model, processor, image) -> np.ndarray:
    """transformers' own steps, done here: processor, model, the classes at the image's size, and
    each painted with its ADE20k colour."""
    from controlnet_aux.util import ade_palette

    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    classes = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    return np.array(ade_palette(), dtype=np.uint8)[classes.numpy()]


def test_upernet_segmentation_matches_transformers_in_the_ade20k_palette(annotators, picture):
    from controlnet_aux.util import ade_palette

    palette = [tuple(c) for c in ade_palette()]  # mmsegmentation's ADE20k palette: wall, building, sky ...
    assert len(palette) == 150 and palette[:3] == [(120, 120, 120), (180, 120, 120), (6, 230, 230)]
    assert palette[-1] == (92, 0, 255)
    model, processor = tiny_upernet(annotators / "upernet-convnext-tiny")
    seg = studio_map("segmentation_ade20k_upernet", picture)
    assert np.array_equal(seg, ade20k_map(model, processor, picture))
    assert len(np.unique(seg.reshape(-1, 3), axis=0)) > 1
    # a resolution: the classes at the working size, brought to the picture's by nearest neighbour
    small = studio_map("segmentation_ade20k_upernet", picture, resolution=96)
    working = picture.resize((120, 96), Image.Resampling.LANCZOS)
    expected = Image.fromarray(ade20k_map(model, processor, working)).resize(
        picture.size, Image.Resampling.NEAREST
    )
    assert np.array_equal(small, pixels(expected))


def test_upernet_segmentation_refuses_a_model_without_ade20ks_classes(annotators, picture):
    tiny_upernet(annotators / "upernet-convnext-tiny", num_labels=19)
    with pytest.raises(ModelError, match="upernet-convnext-tiny has 19 classes, not ADE20k's 150"):
        preprocessors.preprocess("segmentation_ade20k_upernet", picture)


def test_upernet_missing_names_the_repo_files_and_where_they_are_looked_for(
    annotators, picture, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    local = annotators / "upernet-convnext-tiny"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")  # a partial download: only the missing files are named
    with pytest.raises(ModelError) as caught:
        preprocessors.preprocess("segmentation_ade20k_upernet", picture)
    message = str(caught.value)
    assert (
        "segmentation (UperNet ConvNeXt-T, ADE20k) preprocessor needs the hub model openmmlab/upernet-convnext-tiny"
        in message
    )
    assert f"(preprocessor_config.json, model.safetensors missing in {local}" in message
    assert f"not in the Hugging Face cache {tmp_path / 'hub'}" in message
    assert f"hf download openmmlab/upernet-convnext-tiny --local-dir {local}" in message


def test_uniformer_segmentation_says_what_it_lacks_and_what_to_use(annotators, picture):
    with pytest.raises(ModelError, match="no UniFormer detector.*mmcv-full and mmsegmentation") as caught:
        preprocessors.preprocess("segmentation_ade20k", picture)
    assert "use the segmentation_ade20k_upernet preprocessor" in str(caught.value)
    assert "openmmlab/upernet-convnext-tiny" in str(caught.value)


def test_the_controlnet_tab_offers_the_upernet_segmentation(studio):
    import gradio as gr

    from tabs import controlnet as controlnet_tab
    from tabs.common import make_bus

    with gr.Blocks():
        tab = controlnet_tab.build(studio, make_bus())
    choices = [tuple(choice) for choice in tab.units[0].preprocessor.choices]
    assert ("segmentation (UperNet ConvNeXt-T, ADE20k)", "segmentation_ade20k_upernet") in choices
