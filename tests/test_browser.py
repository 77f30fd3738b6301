"""The full app in a real headless Chromium (Playwright): generate, browse, share links, mistakes.

Uses the trained `toy-sd` once it exists, else the tiny random pipeline (see tests/e2e.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from e2e import pick_model, serve, server_tracebacks

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 120_000  # the machine may be busy training a model: be patient, never sleep
PROMPT = "a red circle on the left"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} to drive"),
]


@pytest.fixture(scope="module")
def model(request) -> str:
    return pick_model(request)


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("e2e_browser"), model) as (url, studio):
        yield SimpleNamespace(url=url, studio=studio, model=model)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()


def open_app(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#t2i-prompt textarea")


def prompt_box(page):
    return page.locator("#t2i-prompt textarea")


def seed_box(page):
    return page.get_by_label("Seed (-1: random)")


def model_box(page):
    """The txt2img tab's model dropdown (the gallery tab has a "Model" filter too)."""
    return page.locator("[role=tabpanel]:visible").get_by_label("Model", exact=True)


def number(page, label: str):
    """The number box of a txt2img slider."""
    return page.get_by_label(f"number input for {label}", exact=True).first


def toast(page, text: str):
    """A toast (gr.Error / gr.Warning / gr.Info) whose text contains `text`."""
    return page.locator(".toast-body").filter(has_text=text)


def test_generate_then_find_it_in_the_gallery(page, app, tmp_path, capfd):
    open_app(page, app.url)
    before = app.studio.gallery.count()
    prompt_box(page).fill(PROMPT)
    page.click("#t2i-generate")
    page.wait_for_selector("#t2i-images img")
    page.wait_for_function("document.querySelector('#t2i-info').innerText.includes('seeds')")

    assert app.studio.gallery.count() == before + 1
    item = app.studio.gallery.search(PROMPT, page_size=1).items[0]
    assert item.prompt == PROMPT
    info = page.inner_text("#t2i-info")
    assert f"seeds {item.seed}" in info and f"gallery ids {item.id}" in info
    caption = page.locator("#t2i-images img").first.get_attribute("alt")
    assert caption == f"seed {item.seed}"

    shot = tmp_path / "txt2img.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, "/tmp/e2e-txt2img.png")

    page.get_by_role("tab", name="Gallery").click()
    panel = page.locator("[role=tabpanel]:visible")
    thumb = panel.locator(f'button.thumbnail-item img[alt="#{item.id} {PROMPT}"]')
    thumb.wait_for()
    thumb.click()
    # The settings view (a JSON block labelled "Settings") shows the clicked image's record.
    settings_view = panel.locator(".block").filter(has=page.get_by_text("Settings", exact=True))
    settings_view.get_by_text(f'"{PROMPT}"', exact=True).first.wait_for()
    assert settings_view.get_by_text(str(item.seed), exact=True).count() >= 1
    assert (
        panel.locator(".block")
        .filter(has=page.get_by_text("Selected image", exact=True))
        .locator("img")
        .count()
        == 1
    )
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_share_link_fills_the_form(page, app, capfd):
    from studio.presets import encode_link
    from studio.txt2img import Txt2ImgSettings

    before = app.studio.gallery.count()
    token = encode_link(
        Txt2ImgSettings(prompt="a blue square at the top", model=app.model, seed=123, steps=7)
    )
    open_app(page, f"{app.url}?tab=txt2img&s={token}")
    page.wait_for_function(
        "document.querySelector('#t2i-prompt textarea').value === 'a blue square at the top'"
    )
    assert prompt_box(page).input_value() == "a blue square at the top"
    page.wait_for_function("(el) => el.value === '123'", arg=seed_box(page).element_handle())
    assert seed_box(page).input_value() == "123"
    assert number(page, "Steps").input_value() == "7"
    assert toast(page, "Error").count() == 0

    # A link made with another model keeps its own steps, guidance and sampler (the model's
    # defaults apply only when the user picks a model).
    other = "sd-1.5"  # only its catalog defaults are read: nothing is loaded
    token = encode_link(
        Txt2ImgSettings(prompt="two shapes", model=other, seed=9, steps=7, guidance=2.5, scheduler="Euler")
    )
    open_app(page, f"{app.url}?tab=txt2img&s={token}")
    page.wait_for_function("document.querySelector('#t2i-prompt textarea').value === 'two shapes'")
    assert model_box(page).input_value() == other
    assert seed_box(page).input_value() == "9"
    assert number(page, "Steps").input_value() == "7"
    assert number(page, "Guidance (CFG)").input_value() == "2.5"
    assert page.get_by_label("Sampler").input_value() == "Euler"

    # A broken link: a warning, and the page still works.
    open_app(page, f"{app.url}?s=v1.garbage!!")
    toast(page, "share link can't be opened").first.wait_for()
    assert prompt_box(page).is_visible()
    prompt_box(page).fill("still typing")
    assert prompt_box(page).input_value() == "still typing"
    assert app.studio.gallery.count() == before
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_empty_prompt_shows_an_error_and_the_page_keeps_working(page, app, capfd):
    open_app(page, app.url)
    before = app.studio.gallery.count()
    prompt_box(page).fill("")
    page.click("#t2i-generate")
    toast(page, "prompt is empty").first.wait_for()
    assert app.studio.gallery.count() == before

    prompt_box(page).fill("a green triangle at the bottom")
    seed_box(page).fill("77")
    page.click("#t2i-generate")
    page.wait_for_function("document.querySelector('#t2i-info').innerText.includes('seeds 77')")
    assert app.studio.gallery.count() == before + 1
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_picking_a_model_brings_its_defaults(page, app, capfd):
    open_app(page, app.url)
    model_box(page).click()
    page.get_by_role("option", name="sd-1.5", exact=True).click()
    # sd-1.5's catalog defaults: 25 steps, guidance 7, 512 x 512
    page.wait_for_function("(el) => el.value === '512'", arg=number(page, "Width").element_handle())
    assert number(page, "Guidance (CFG)").input_value() == "7"
    assert number(page, "Steps").input_value() == "25"
    assert page.get_by_label("Sampler").input_value() == "(model default)"
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_stop_cancels_within_a_step_and_stores_nothing(page, app, capfd):
    open_app(page, app.url)
    before = app.studio.gallery.count()
    prompt_box(page).fill("three yellow triangles")
    number(page, "Steps").fill("150")
    number(page, "Steps").press("Enter")
    page.click("#t2i-generate")
    page.wait_for_selector(".progress-text, .eta-bar", state="attached")
    page.click("#t2i-stop")
    page.wait_for_function("document.querySelector('#t2i-info').innerText.includes('Cancelled')")
    assert app.studio.gallery.count() == before
    # The lane is free again: the next generation runs.
    number(page, "Steps").fill("3")
    number(page, "Steps").press("Enter")
    page.click("#t2i-generate")
    page.wait_for_function("document.querySelector('#t2i-info').innerText.includes('seeds')")
    assert app.studio.gallery.count() == before + 1
    assert page.errors == []
    assert server_tracebacks(capfd) == ""
