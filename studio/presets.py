"""Named presets (`presets/*.json`) and share links that carry settings in a URL.

A share link's token is `v1.` + base64url(zlib(JSON of the settings)): compact, URL-safe
and versioned. Decoding treats the token as hostile: its length and the inflated size
are capped before anything is parsed, and the settings are rebuilt through the same
strict `from_dict` as every other way in, so a link can't carry anything a form can't.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from .registry import settings_from_dict
from .settings import Settings, SettingsError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
LINK_VERSION = "v1"
MAX_TOKEN_CHARS = 4096
MAX_JSON_BYTES = 32 * 1024


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: Settings


def check_preset_name(name: str) -> str:
    if not isinstance(name, str) or not PRESET_NAME.match(name):
        raise SettingsError(
            "a preset name is 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def list_presets(directory: Path = PRESET_DIR, technique: str | None = None) -> list[Preset]:
    presets = []
    for path in sorted(directory.glob("*.json")):
        preset = load_preset(path.stem, directory)
        if technique is None or preset.settings.technique == technique:
            presets.append(preset)
    return presets


def load_preset(name: str, directory: Path = PRESET_DIR) -> Preset:
    path = directory / f"{check_preset_name(name)}.json"
    if not path.is_file():
        raise SettingsError(f"no preset named {name!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"preset {name!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "settings" not in data:
        raise SettingsError(f"preset {name!r} has no settings")
    return Preset(name, str(data.get("description", "")), settings_from_dict(data["settings"]))


def save_preset(name: str, settings: Settings, description: str = "", directory: Path = PRESET_DIR) -> Path:
    path = directory / f"{check_preset_name(name)}.json"
    body = {"description": description, "settings": settings.to_dict()}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def encode_link(settings: Settings) -> str:
    raw = json.dumps(settings.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    token = base64.urlsafe_b64encode(zlib.compress(raw, 9)).rstrip(b"=").decode()
    return f"{LINK_VERSION}.{token}"


def decode_link(token: str) -> Settings:
    if not isinstance(token, str) or not token:
        raise SettingsError("the share link carries no settings")
    if len(token) > MAX_TOKEN_CHARS:
        raise SettingsError(
            f"the share link is too long ({len(token)} characters; at most {MAX_TOKEN_CHARS})"
        )
    version, _, body = token.partition(".")
    if version != LINK_VERSION:
        raise SettingsError(
            f"the share link is of an unknown version {version[:8]!r}; this studio reads {LINK_VERSION}"
        )
    try:
        packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_JSON_BYTES)
        if inflater.unconsumed_tail:
            raise SettingsError("the share link's settings are too large")
        data = json.loads(raw.decode("utf-8"))
    except SettingsError:
        raise
    except (binascii.Error, zlib.error, UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise SettingsError("the share link is damaged: its settings could not be read") from None
    return settings_from_dict(data)


def share_url(base_url: str, settings: Settings) -> str:
    return f"{base_url.rstrip('/')}/?tab={settings.technique}&s={encode_link(settings)}"
