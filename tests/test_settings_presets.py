"""Settings round-trips, presets and share links — including hostile input."""

from __future__ import annotations

import base64
import json
import zlib

import pytest

from studio.models import LoraRef
from studio.presets import (
    PRESET_DIR,
    decode_link,
    encode_link,
    list_presets,
    load_preset,
    save_preset,
    share_url,
)
from studio.registry import settings_from_dict
from studio.settings import SettingsError
from studio.txt2img import Txt2ImgSettings

FULL = Txt2ImgSettings(
    prompt="a red circle",
    model="toy-sd",
    negative_prompt="blue",
    seed=5,
    steps=20,
    guidance=3.5,
    width=64,
    height=64,
    scheduler="DDIM",
    batch_size=2,
    batch_count=3,
    loras=(LoraRef("a.safetensors", 0.5),),
)


def test_settings_round_trip_through_dict_and_json():
    data = json.loads(json.dumps(FULL.to_dict()))
    assert data["technique"] == "txt2img" and data["schema_version"] == 1
    assert Txt2ImgSettings.from_dict(data) == FULL
    assert settings_from_dict(data) == FULL


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"steps": "20"}, "whole number"),
        ({"guidance": True}, "number"),
        ({"evil": 1}, "unknown settings"),
        ({"schema_version": 99}, "schema version"),
        ({"technique": "sdedit"}, "not 'txt2img'"),
        ({"loras": [{"source": "x", "weight": 1, "extra": 2}]}, "unknown keys"),
        ({"width": 7}, "between 8"),
    ],
)
def test_from_dict_is_strict(patch, message):
    data = FULL.to_dict() | patch
    with pytest.raises(SettingsError, match=message):
        Txt2ImgSettings.from_dict(data)


def test_every_preset_loads():
    presets = list_presets()
    assert len(presets) >= 8
    assert {p.settings.model for p in presets} >= {
        "toy-sd",
        "sd-1.5",
        "sdxl-base",
        "sdxl-turbo",
        "flux.1-dev",
    }
    for path in PRESET_DIR.glob("*.json"):
        assert load_preset(path.stem).settings.technique == "txt2img"


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "a/b", "", "UPPER", "x" * 65, "..", "a\x00b"]
)
def test_hostile_preset_names_are_refused(name, tmp_path):
    with pytest.raises(SettingsError, match="preset name"):
        load_preset(name)
    with pytest.raises(SettingsError, match="preset name"):
        save_preset(name, FULL, directory=tmp_path)


def test_save_then_load_preset(tmp_path):
    save_preset("mine", FULL, "d", directory=tmp_path)
    assert load_preset("mine", tmp_path).settings == FULL


def test_share_link_round_trip_is_compact_and_url_safe():
    token = encode_link(FULL)
    assert token.startswith("v1.") and len(token) < 400
    assert all(c.isalnum() or c in "-_." for c in token)
    assert decode_link(token) == FULL
    url = share_url("http://127.0.0.1:7860/", FULL)
    assert url.startswith("http://127.0.0.1:7860/?tab=txt2img&s=v1.")


def _token(payload: bytes) -> str:
    return "v1." + base64.urlsafe_b64encode(zlib.compress(payload)).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token, message",
    [
        ("", "no settings"),
        ("v9.abc", "unknown version"),
        ("v1.!!!!", "damaged"),
        ("v1." + "A" * 5000, "too long"),
        (_token(b"not json"), "damaged"),
        (_token(b"[1,2,3]"), "JSON object"),
        (_token(json.dumps({"technique": "rm -rf"}).encode()), "unknown technique"),
        (_token(json.dumps(FULL.to_dict() | {"steps": 10**9}).encode()), "steps"),
        (_token(b"{" + b" " * 200_000 + b"}"), "too large"),
    ],
)
def test_broken_or_hostile_links_get_a_clear_message(token, message):
    with pytest.raises(SettingsError, match=message):
        decode_link(token)
