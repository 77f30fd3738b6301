"""The Trainer tab through the API (gradio_client) and a real headless Chromium.

Trains the tiny random model for a few steps: what is checked is the path a user takes
(pictures in, a job with progress, loss and samples, cancel and resume, a LoRA that txt2img
lists), not whether the model learns (bench/bench_trainer.py measures that).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from e2e import serve, server_tracebacks
from gradio_client import Client
from test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

from studio.toyworld.captions import parse_caption, sample_scene
from studio.toyworld.render import render


@pytest.fixture(scope="module")
def stars(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tab_stars")
    rng = random.Random(5)
    for i in range(3):
        render(sample_scene(parse_caption("a large shape"), rng, shape_pool=("star",))).save(
            folder / f"s{i}.png"
        )
    return folder


@pytest.fixture(scope="module")
def app(tiny_sd, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("trainer_tab"), str(tiny_sd)) as (url, studio):
        yield url, studio


def settings(tiny_sd, stars, **changes) -> dict:
    return {
        "technique": "train",
        "model": str(tiny_sd),
        "images": str(stars),
        "steps": 3,
        "learning_rate": 1e-2,
        "checkpoint_every": 3,
        "sample_every": 3,
        "name": "api-star",
        **changes,
    }


def test_the_train_endpoint_trains_and_txt2img_lists_the_lora(app, tiny_sd, stars, capfd):
    url, studio = app
    client = Client(url, verbose=False)
    result = client.predict(json.dumps(settings(tiny_sd, stars)), api_name="/train")
    assert result["steps"] == 3 and result["job_id"] > 0
    assert Path(result["installed"]).name == "api-star.safetensors"
    assert "api-star" in [s.name for s in studio.models.loras()]
    assert studio.jobs.get(result["job_id"]).settings["name"] == "api-star"

    with pytest.raises(Exception, match="method must be one of"):
        client.predict(json.dumps(settings(tiny_sd, stars, method="hypernetwork")), api_name="/train")
    assert server_tracebacks(capfd) == ""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} to drive")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.browser
def test_train_from_the_tab_cancel_resume_and_see_samples(app, browser, tiny_sd, stars, capfd):
    url, studio = app
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.get_by_role("tab", name="Trainer").click()
    page.locator("#train-model input").fill(str(tiny_sd))
    page.locator("#train-model input").press("Enter")
    page.locator("#train-images textarea").fill(str(stars))
    page.locator("#train-steps input").fill("5000")
    page.locator("#train-sample-every input").fill("5000")
    page.locator("#train-name textarea").fill("tab-star")
    page.click("#train-start")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('running')")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('step ')")
    page.click("#train-cancel")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('cancelled')")
    cancelled = studio.jobs.list("training", 1)[0]
    assert cancelled.status == "cancelled" and cancelled.step > 0

    # Resume continues the stopped job in a new one, from its checkpoint.
    page.click("#train-resume")
    page.wait_for_function(
        f"document.querySelector('#train-status').innerText.includes('#{cancelled.id + 1}')"
    )
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('step ')")
    page.click("#train-cancel")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('cancelled')")
    resumed = studio.jobs.get(cancelled.id + 1)
    assert resumed.status == "cancelled" and resumed.out_dir == cancelled.out_dir
    assert resumed.metrics[0]["step"] == cancelled.step + 1  # it went on from the checkpoint

    # A short run with prior preservation, on the paper's target, ends with samples, a loss
    # curve and how to use the LoRA.
    page.locator("#train-steps input").fill("4")
    page.locator("#train-sample-every input").fill("2")
    page.locator("#train-name textarea").fill("tab-star-short")
    page.locator("#train-prior input").check()
    page.locator("#train-class-prompt textarea").fill("a shape")
    page.locator("#train-class-images input").fill("2")
    assert page.locator("#train-prior-target input").input_value() == "base-model"
    page.locator("#train-prior-target input").click()
    page.get_by_role("option", name="class-pictures", exact=True).click()
    page.click("#train-start")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('done')")
    short = studio.jobs.get(cancelled.id + 2).settings
    assert short["prior_preservation"] and short["prior_target"] == "class-pictures"
    assert "tab-star-short:1.0" in page.inner_text("#train-status")
    page.wait_for_selector("#train-samples img")
    assert page.locator("#train-samples img").count() >= 2
    assert "tab-star-short" in [s.name for s in studio.models.loras()]

    # txt2img's LoRA list has it at once.
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#t2i-add-lora input").click()
    page.get_by_role("option", name="tab-star-short", exact=True).click()
    page.wait_for_function(
        "[...document.querySelectorAll('textarea')].some(t => t.value.includes('tab-star-short:1.0'))"
    )
    assert errors == []
    assert server_tracebacks(capfd) == ""
