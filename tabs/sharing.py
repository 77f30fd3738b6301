"""A tab's share link and presets: the "Copy share link" row, the two preset rows, and their
events. A preset is a named settings file (`studio.presets`); a share link carries the
settings in the URL (`common.share_link`). Both hold one frozen settings dataclass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from studio.presets import list_presets, load_preset, save_preset
from studio.settings import Settings, SettingsError

from .common import share_link, user_errors

PRIVATE = {"api_visibility": "private"}


def preset_names(techniques: tuple[str, ...]) -> list[str]:
    return [p.name for p in list_presets() if p.settings.technique in techniques]


@dataclass
class Sharing:
    techniques: tuple[str, ...]  # the settings kinds this tab's presets hold
    label: str  # the tab's name in messages
    link_button: gr.Button
    link: gr.Textbox
    preset: gr.Dropdown
    load_button: gr.Button
    preset_name: gr.Textbox
    save_button: gr.Button

    def wire(
        self,
        *,
        inputs: set,
        outputs: list,
        settings_of: Callable[[dict], Settings],
        to_form: Callable[[Settings], dict],
        for_preset: Callable[[Settings], Settings] = lambda s: s,
    ) -> None:
        """`inputs`: the form components `settings_of(data)` reads; `outputs`: those `to_form`
        fills; `for_preset` drops what only this picture has (a gallery id) before saving."""

        @user_errors
        def make_link(data: dict, request: gr.Request):
            return share_link(request, settings_of(data))

        @user_errors
        def apply_preset(name):
            if not name:
                raise SettingsError("choose a preset first")
            settings = load_preset(name).settings
            if settings.technique not in self.techniques:
                raise SettingsError(f"preset {name!r} is for {settings.technique}, not {self.label}")
            return to_form(settings)

        @user_errors
        def store_preset(data: dict):
            name = data[self.preset_name]
            save_preset(name, for_preset(settings_of(data)))
            return gr.update(choices=preset_names(self.techniques), value=name)

        self.link_button.click(make_link, inputs, self.link, **PRIVATE)
        self.load_button.click(apply_preset, self.preset, outputs, **PRIVATE)
        self.save_button.click(store_preset, inputs | {self.preset_name}, self.preset, **PRIVATE)


def sharing_rows(techniques: tuple[str, ...], label: str, placeholder: str, elem_prefix: str = "") -> Sharing:
    """Lays out the link row and the preset rows where it is called; `elem_prefix` names them
    (`<prefix>-link`, `<prefix>-preset`, `<prefix>-preset-name`) for tests and styling."""

    def elem(suffix: str) -> str | None:
        return f"{elem_prefix}-{suffix}" if elem_prefix else None

    with gr.Row():
        link_button = gr.Button("Copy share link", size="sm")
        link = gr.Textbox(label="Share link", buttons=["copy"], interactive=False, elem_id=elem("link"))
    with gr.Row():
        preset = gr.Dropdown(preset_names(techniques), label="Preset", value=None, elem_id=elem("preset"))
        load_button = gr.Button("Load preset", size="sm")
    with gr.Row():
        preset_name = gr.Textbox(label="Save as preset", placeholder=placeholder, elem_id=elem("preset-name"))
        save_button = gr.Button("Save preset", size="sm")
    return Sharing(techniques, label, link_button, link, preset, load_button, preset_name, save_button)
