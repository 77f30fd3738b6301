"""The model manager: resolution, refusals, the LRU cache, from_pipe sharing, patches undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.models import LoraRef, ModelError, ModelManager, module_bytes
from studio.txt2img import Txt2ImgSettings, run


def settings(model, **kw):
    base = dict(prompt="a red circle", model=str(model), seed=3, steps=3, guidance=4.0, width=64, height=64)
    base.update(kw)
    return Txt2ImgSettings(**base)


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, dtype=torch.float32)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    torch.manual_seed(0)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_catalog_has_the_models_users_expect():
    names = set(ModelManager().catalog)
    assert {
        "toy-sd",
        "toy-sd3",
        "sd-1.5",
        "sdxl-base",
        "sdxl-refiner",
        "sdxl-turbo",
        "sd-3.5-medium",
        "flux.1-schnell",
        "flux.1-dev",
        "lcm-lora-sdv1-5",
    } <= names


@pytest.mark.parametrize("name", ["model.ckpt", "x/unet.bin", "weights.pt", "a.pth", "evil.pkl"])
def test_pickles_are_refused(name):
    with pytest.raises(ModelError, match="pickle"):
        ModelManager().resolve(name)


def test_unknown_model_names_what_to_do():
    with pytest.raises(ModelError, match="not in the catalog"):
        ModelManager().resolve("no such model!")


def test_unreachable_hub_model_is_one_clear_sentence(monkeypatch, manager):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not be reached") as info:
        with manager.lend("someone/not-a-cached-model"):
            pass
    assert "\n" not in str(info.value)


def test_single_file_family_is_read_from_tensor_names(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, path)
    assert ModelManager().resolve(str(path)).family == "sdxl"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, path)
    spec = ModelManager().resolve(str(path))
    assert spec.family == "sd" and spec.single_file
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable"):
        ModelManager().resolve(str(bad))


def test_other_tasks_share_modules_through_from_pipe(tiny_sd):
    m = ModelManager(device="cpu")
    with m.lend(str(tiny_sd)) as t2i:
        unet = t2i.unet
    with m.lend(str(tiny_sd), "img2img") as i2i:
        assert type(i2i).__name__ == "StableDiffusionImg2ImgPipeline"
        assert i2i.unet is unet
    assert len(m.cached()) == 1


def test_lru_budget_evicts_whole_pipelines(tiny_sd, tiny_sd3):
    probe = ModelManager(device="cpu")
    sd_bytes = module_bytes(probe.base(str(tiny_sd)))
    sd3_bytes = module_bytes(probe.base(str(tiny_sd3)))
    m = ModelManager(device="cpu", budget_bytes=max(sd_bytes, sd3_bytes) + 1)
    m.base(str(tiny_sd))
    m.base(str(tiny_sd3))
    assert m.cached() == [str(tiny_sd3)]
    assert m.cache_bytes() <= m.budget_bytes
    m.base(str(tiny_sd3))  # a hit loads nothing
    assert m.cached() == [str(tiny_sd3)]


def test_lora_applies_for_the_request_and_is_removed_after(tiny_sd, tiny_lora):
    m = ModelManager(device="cpu")
    before = np.asarray(run(settings(tiny_sd), m).images[0])
    with_lora = np.asarray(run(settings(tiny_sd, loras=(LoraRef(str(tiny_lora), 1.0),)), m).images[0])
    after = np.asarray(run(settings(tiny_sd), m).images[0])
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(before, after)
    pipe = m.base(str(tiny_sd))
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_lora_weights_scale_the_effect(tiny_sd, tiny_lora):
    m = ModelManager(device="cpu")
    base = np.asarray(run(settings(tiny_sd), m).images[0], dtype=float)
    weak = np.asarray(run(settings(tiny_sd, loras=(LoraRef(str(tiny_lora), 0.2),)), m).images[0], dtype=float)
    strong = np.asarray(
        run(settings(tiny_sd, loras=(LoraRef(str(tiny_lora), 1.0),)), m).images[0], dtype=float
    )
    assert np.abs(weak - base).mean() < np.abs(strong - base).mean()


def test_bad_lora_is_refused_and_leaves_the_model_clean(tiny_sd, tmp_path):
    m = ModelManager(device="cpu")
    with pytest.raises(ModelError, match="pickle"):
        run(settings(tiny_sd, loras=(LoraRef(str(tmp_path / "x.ckpt"), 1.0),)), m)
    with pytest.raises(ModelError, match="not found"):
        run(settings(tiny_sd, loras=(LoraRef(str(tmp_path / "missing"), 1.0),)), m)
    assert not any("lora" in n for n, _ in m.base(str(tiny_sd)).unet.named_parameters())


def test_attention_processors_are_restored(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor

    m = ModelManager(device="cpu")
    pipe = m.base(str(tiny_sd))
    original = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    patch = {k: AttnProcessor() for k in pipe.unet.attn_processors}
    with m.lend(str(tiny_sd), attn_processors=patch) as lent:
        assert all(isinstance(p, AttnProcessor) for p in lent.unet.attn_processors.values())
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == original


def test_nothing_happens_at_import():
    import subprocess
    import sys

    code = (
        "import sys; import app, studio.models, studio.service, studio.txt2img, tabs.txt2img, tabs.gallery;"
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(__import__("pathlib").Path(__file__).parent.parent),
    )
    assert out.returncode == 0, out.stderr[-2000:]
