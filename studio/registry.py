"""Which settings class a technique name stands for: presets, links and gallery rows use it."""

from __future__ import annotations

from .controlnet import ControlNetSettings
from .evaluate import EvaluationSettings
from .instantid import InstantIDSettings
from .ip2p import InstructPix2PixSettings
from .ip_adapter import IPAdapterSettings
from .p2p import PromptToPromptSettings
from .sdedit import SDEditSettings
from .settings import Settings, SettingsError
from .txt2img import Txt2ImgSettings

SETTINGS_TYPES: dict[str, type[Settings]] = {
    cls.technique: cls
    for cls in (
        Txt2ImgSettings,
        SDEditSettings,
        InstructPix2PixSettings,
        PromptToPromptSettings,
        ControlNetSettings,
        IPAdapterSettings,
        InstantIDSettings,
        EvaluationSettings,
    )
}


def settings_from_dict(data: dict) -> Settings:
    if not isinstance(data, dict):
        raise SettingsError("settings must be a JSON object")
    technique = data.get("technique")
    if technique not in SETTINGS_TYPES:
        raise SettingsError(f"unknown technique {technique!r}; known: {', '.join(SETTINGS_TYPES)}")
    return SETTINGS_TYPES[technique].from_dict(data)
