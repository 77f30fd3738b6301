"""Latent Studio: `python app.py` serves the studio at http://127.0.0.1:7860 on the toy model.

Builds one Studio (model manager + gallery), renders each tab, routes the settings bus
(restore / send to / share links) between tabs, and launches. Options:
    --host, --port, --data-dir (or LATENT_STUDIO_DATA), --device, --offload, --budget-gb
"""

from __future__ import annotations

import argparse
import os

import gradio as gr

from studio.models import ModelManager
from studio.presets import decode_link
from studio.service import Paths, Studio
from studio.settings import SettingsError
from tabs import controlnet as controlnet_tab
from tabs import editing as editing_tab
from tabs import evaluation as evaluation_tab
from tabs import gallery as gallery_tab
from tabs import ip_adapter as ip_adapter_tab
from tabs import p2p as p2p_tab
from tabs import trainer as trainer_tab
from tabs import txt2img as txt2img_tab
from tabs.common import TAB_IDS, bus_message, make_bus, on_message, tab_switch
from tabs.launch import launch_options

TITLE = "Latent Studio"


def build_app(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"# {TITLE}\nText-to-image, editing, control and training — on the toy world or your own GPU."
        )
        bus = make_bus()
        routed = gr.State(None)  # the nonce of the last bus message that switched tabs
        with gr.Tabs() as tabs:
            # registered before the tabs' own bus listeners, so the switch is not last in line
            on_message(bus, tab_switch, [tabs], seen=routed, queue=False)
            with gr.Tab("txt2img", id="txt2img"):
                txt2img_tab.build(studio, bus)
            with gr.Tab("Editing", id="editing"):
                editing_tab.build(studio, bus)
            with gr.Tab("Prompt-to-Prompt", id="p2p"):
                p2p_tab.build(studio, bus)
            with gr.Tab("ControlNet", id="controlnet"):
                controlnet_tab.build(studio, bus)
            with gr.Tab("IP-Adapter", id="ip_adapter"):
                ip_adapter_tab.build(studio, bus)
            with gr.Tab("Evaluation", id="evaluation"):
                evaluation_tab.build(studio, bus)
            with gr.Tab("Trainer", id="trainer"):
                trainer_tab.build(studio, bus)
            with gr.Tab("Gallery", id="gallery") as gallery:
                gallery_ui = gallery_tab.build(
                    studio,
                    bus,
                    send_targets=[
                        ("editing", "editing"),
                        ("ControlNet", "controlnet"),
                        ("IP-Adapter", "ip_adapter"),
                        ("evaluation", "evaluation"),
                    ],
                )

        gallery_ui.refresh_on(gallery.select)

        def open_link(request: gr.Request):
            params = dict(request.query_params) if request else {}
            token = params.get("s")
            if not token:
                return None
            try:
                settings = decode_link(token)
            except SettingsError as exc:
                gr.Warning(f"This share link can't be opened: {exc}")
                return None
            # the tab that runs the technique (sdedit and ip2p share the Editing tab)
            target = TAB_IDS.get(settings.technique, settings.technique)
            return bus_message(target, settings.to_dict())

        demo.load(open_link, None, bus.message, api_visibility="private")
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="toy-sd", help="the model the tabs start with")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--offload", default="none", choices=("none", "model", "sequential"))
    parser.add_argument("--budget-gb", type=float, default=None, help="memory budget of the pipeline cache")
    args = parser.parse_args(argv)
    budget = int(args.budget_gb * 2**30) if args.budget_gb else None
    studio = Studio(
        Paths.from_env(args.data_dir),
        ModelManager(device=args.device, offload=args.offload, budget_bytes=budget),
        default_model=args.model,
    )
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=1).launch(
        **launch_options(studio, server_name=args.host, server_port=args.port)
    )


if __name__ == "__main__":
    main()
