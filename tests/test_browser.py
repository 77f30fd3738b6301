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
def app(model, tiny_sd, tmp_path_factory):
    # tiny_sd (the Editing tests' model) is built here, before any test's capfd: building it
    # imports diffusers, whose log handler keeps the sys.stderr of that moment. Imported
    # first inside a capfd test, its later warnings (from_pipe's float32 note on img2img)
    # would hit that test's closed stream and print a "Logging error" traceback.
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


def open_in_gallery(page, item_id: int, prompt: str):
    """Select the Gallery tab, click the picture's thumbnail and wait for its record to show;
    returns the tab's panel."""
    page.get_by_role("tab", name="Gallery").click()
    panel = page.locator("[role=tabpanel]:visible")
    panel.locator(f'button.thumbnail-item img[alt="#{item_id} {prompt}"]').click()
    panel.get_by_text(f'"{prompt}"', exact=True).first.wait_for()
    return panel


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

    panel = open_in_gallery(page, item.id, PROMPT)
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


def test_a_saved_preset_loads_back_and_the_form_gives_a_share_link(page, app, capfd):
    import uuid
    from urllib.parse import parse_qs, urlsplit

    from studio.presets import PRESET_DIR, decode_link

    name = f"e2e-{uuid.uuid4().hex[:8]}"
    open_app(page, app.url)
    panel = page.locator("[role=tabpanel]:visible")
    prompt_box(page).fill("a blue square at the top")
    try:
        panel.get_by_label("Save as preset").fill(name)
        panel.get_by_role("button", name="Save preset").click()
        page.wait_for_function(
            "(name) => document.querySelector('#t2i-preset input').value === name", arg=name
        )
        assert (PRESET_DIR / f"{name}.json").is_file()
        prompt_box(page).fill("something else")
        panel.get_by_role("button", name="Load preset").click()
        page.wait_for_function(
            "document.querySelector('#t2i-prompt textarea').value === 'a blue square at the top'"
        )
    finally:
        (PRESET_DIR / f"{name}.json").unlink(missing_ok=True)
    panel.get_by_role("button", name="Copy share link").click()
    link = page.locator("#t2i-link textarea, #t2i-link input").first
    page.wait_for_function("(el) => el.value.includes('s=')", arg=link.element_handle())
    token = parse_qs(urlsplit(link.input_value()).query)["s"][0]
    assert decode_link(token).prompt == "a blue square at the top"
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
    # 16 × 150 steps: minutes of work, so the Stop click always lands mid-run.
    number(page, "Steps").fill("150")
    number(page, "Steps").press("Enter")
    number(page, "Batch count").fill("16")
    number(page, "Batch count").press("Enter")
    page.click("#t2i-generate")
    # the run itself, not the queue's wait for the lane: its first live preview shows
    page.wait_for_selector("#t2i-preview img")
    page.click("#t2i-stop")
    page.wait_for_function("document.querySelector('#t2i-info').innerText.includes('Cancelled')")
    assert app.studio.gallery.count() == before
    # The lane is free again: the next generation runs.
    number(page, "Steps").fill("3")
    number(page, "Steps").press("Enter")
    number(page, "Batch count").fill("1")
    number(page, "Batch count").press("Enter")
    page.click("#t2i-generate")
    page.wait_for_function("document.querySelector('#t2i-info').innerText.includes('seeds')")
    assert app.studio.gallery.count() == before + 1
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


# ---------------------------------------------------------------- the Editing tab


def open_editing(page, url: str) -> None:
    open_app(page, url)
    page.get_by_role("tab", name="Editing").click()
    page.wait_for_selector("#sdedit-prompt textarea")


def use_tiny_model(page, tiny_sd) -> None:
    """Type the tiny model's folder into the SDEdit model box; wait for its defaults to arrive."""
    box = page.locator("#sdedit-model input")
    box.fill(str(tiny_sd))
    box.press("Enter")
    guidance = page.locator("#edit-sdedit").get_by_label("number input for Guidance (CFG)", exact=True)
    page.wait_for_function("(el) => el.value === '7'", arg=guidance.element_handle())
    assert box.input_value() == str(tiny_sd)


def sdedit_steps(page, steps: int) -> None:
    box = page.locator("#sdedit-steps input[type=number]")
    box.fill(str(steps))
    box.press("Enter")


def edit_info(page) -> str:
    return page.inner_text("#edit-info")


def test_upload_and_sdedit_in_the_editing_tab(page, app, tiny_sd, tmp_path, capfd):
    from PIL import Image

    picture = Image.new("RGB", (70, 60), (255, 255, 255))
    picture.paste((30, 30, 220), (20, 15, 50, 45))
    path = tmp_path / "input.png"
    picture.save(path)

    open_editing(page, app.url)
    before = app.studio.gallery.count()
    page.locator("#edit-input input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#edit-input img")
    use_tiny_model(page, tiny_sd)
    sdedit_steps(page, 4)
    page.locator("#sdedit-prompt textarea").fill("a red square in the center")
    page.click("#edit-generate")
    page.wait_for_function("document.querySelector('#edit-info').innerText.includes('gallery ids')")
    page.wait_for_selector("#edit-images img")

    assert app.studio.gallery.count() == before + 2  # the upload and the edit
    item = app.studio.gallery.search("red square", page_size=1).items[0]
    assert item.technique == "sdedit" and (item.width, item.height) == (64, 56)
    upload = app.studio.gallery.get(item.parent_id)
    assert upload.technique == "upload"
    info = edit_info(page)
    assert f"gallery ids {item.id}" in info and f"edit of #{upload.id}" in info
    assert "input cropped 70×60 to 64×56 (centre)" in info
    assert "3 of 4 steps run (strength 0.6)" in info
    assert page.locator("#edit-images img").first.get_attribute("alt") == f"seed {item.seed}"
    assert page.locator("#edit-compare img").count() == 2  # before / after

    # Running again on the same picture reuses the stored upload as the parent.
    page.click("#edit-generate")
    page.wait_for_function(
        "(id) => document.querySelector('#edit-info').innerText.includes('gallery ids ' + id)",
        arg=item.id + 1,
    )
    assert app.studio.gallery.count() == before + 3
    assert f"edit of #{upload.id}" in edit_info(page)

    page.screenshot(path=str(tmp_path / "editing.png"), full_page=True)
    shutil.copyfile(tmp_path / "editing.png", "/tmp/e2e-editing.png")
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_gallery_send_to_editing_loads_the_picture(page, app, tiny_sd, capfd):
    from PIL import Image

    picture = Image.new("RGB", (48, 40), (20, 160, 20))
    item = app.studio.gallery.add(
        picture, technique="txt2img", model="toy-sd", prompt="a green field to send", seed=1, settings={}
    )
    open_app(page, app.url)
    open_in_gallery(page, item.id, "a green field to send")
    page.get_by_role("button", name="Send to editing").click()

    # The app switches to the Editing tab, whose input is now the gallery picture.
    page.wait_for_selector("#edit-input img")
    page.wait_for_function(
        "document.querySelector('#edit-input img').naturalWidth === 48 && "
        "document.querySelector('#edit-input img').naturalHeight === 40"
    )
    page.get_by_role("tab", name="Editing", selected=True).wait_for()  # routed on the same message

    # An edit of it is the gallery item's child: no upload was stored.
    before = app.studio.gallery.count()
    use_tiny_model(page, tiny_sd)
    sdedit_steps(page, 2)
    page.locator("#sdedit-prompt textarea").fill("a green field with a red circle")
    page.click("#edit-generate")
    page.wait_for_function("document.querySelector('#edit-info').innerText.includes('gallery ids')")
    assert app.studio.gallery.count() == before + 1
    assert f"edit of #{item.id}" in edit_info(page)
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_an_unreadable_upload_is_a_clear_error(page, app, tmp_path, capfd):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")  # gradio's own image preprocessing would raise a traceback here
    open_editing(page, app.url)
    before = app.studio.gallery.count()
    page.locator("#edit-input input[type=file]").set_input_files(str(path))
    page.locator("#sdedit-prompt textarea").fill("a red square")
    page.click("#edit-generate")
    toast(page, "the input is not a readable image").first.wait_for()
    assert app.studio.gallery.count() == before
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_prompt_to_prompt_tab_shows_both_images_and_the_maps(page, app, tmp_path, capfd):
    from studio.p2p import PromptToPromptSettings
    from studio.presets import encode_link

    # A share link opens the P2P tab with its settings, as a user would receive it.
    link = PromptToPromptSettings(
        prompt="a red circle on the left",
        edit_prompt="a red square on the left",
        model=app.model,
        seed=21,
        steps=5,
        local_blend=("circle", "square"),
    )
    open_app(page, f"{app.url}?s={encode_link(link)}")
    page.wait_for_function(
        "(document.querySelector('#p2p-edit-prompt textarea') || {}).value === 'a red square on the left'"
    )
    assert (
        page.locator("#p2p-local-blend textarea, #p2p-local-blend input").first.input_value()
        == "circle square"
    )
    before = app.studio.gallery.count()
    page.click("#p2p-generate")
    page.wait_for_function("document.querySelector('#p2p-info').innerText.includes('gallery #')")
    assert page.locator("#p2p-compare img").count() == 2  # source / edited
    page.wait_for_selector("#p2p-source-maps img")
    page.wait_for_selector("#p2p-edited-maps img")
    assert app.studio.gallery.count() == before + 2
    edited = app.studio.gallery.search("a red square on the left", page_size=1).items[0]
    assert edited.parent_id is not None and edited.seed == 21
    assert f"#{edited.id} (edited, its child)" in page.inner_text("#p2p-info")

    # A prompt pair that can't be aligned is a clear message, and nothing is stored.
    page.locator("#p2p-edit-prompt textarea").fill("a big red square on the left")
    page.click("#p2p-generate")
    toast(page, "replace swaps words one for one").first.wait_for()
    assert app.studio.gallery.count() == before + 2
    page.screenshot(path=str(tmp_path / "p2p.png"), full_page=True)
    shutil.copyfile(tmp_path / "p2p.png", "/tmp/e2e-p2p.png")
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


# ---------------------------------------------------------------- the ControlNet tab

COUNT_UPLOADS = """
window.__uploads = 0;
const fetch0 = window.fetch;
window.fetch = function (input, init) {
    const url = typeof input === "string" ? input : input.url;
    if (!url.includes("/upload")) return fetch0.apply(this, arguments);
    window.__uploads += 1;
    return fetch0.apply(this, arguments).finally(() => { window.__uploads -= 1; });
};
"""


def pick_option(page, box: str, option: str) -> None:
    page.locator(f"{box} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_controlnet_tab_generates_from_a_canny_map(page, app, tiny_sd, tiny_controlnet, tmp_path, capfd):
    from PIL import Image

    picture = Image.new("RGB", (64, 64), (0, 0, 0))
    picture.paste((255, 255, 255), (20, 20, 44, 44))
    path = tmp_path / "square.png"
    picture.save(path)
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 40), (0, 0, 0)).save(small)

    # The map boxes (image editors) upload their pictures whenever an event reads them: the
    # test ends once none is in flight, so that closing the page cuts no upload short.
    page.add_init_script(COUNT_UPLOADS)
    open_app(page, app.url)
    page.get_by_role("tab", name="ControlNet").click()
    page.wait_for_selector("#cn-prompt textarea")
    before = app.studio.gallery.count()

    page.locator("#cn-sampling").get_by_text("Sampling", exact=True).click()
    steps = page.locator("#cn-steps input[type=number]")
    steps.fill("3")
    steps.press("Enter")
    base = page.locator("#cn-model input")
    base.fill(str(tiny_sd))
    base.press("Enter")
    page.wait_for_function("(el) => el.value === '25'", arg=steps.element_handle())  # its defaults came
    steps.fill("3")
    steps.press("Enter")
    control = page.locator("#cn-unit1-model input")
    control.fill(str(tiny_controlnet))
    control.press("Enter")
    pick_option(page, "#cn-unit1-preprocessor", "Canny edges (OpenCV)")
    page.locator("#cn-unit1").get_by_text("low threshold", exact=True).wait_for()
    page.locator("#cn-unit1-image input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#cn-unit1-image img")
    page.locator("#cn-prompt textarea").fill("a white square in the center")

    # Preview map: the canny map fills the (editable) map box.
    page.click("#cn-unit1-preview")
    page.wait_for_selector("#cn-unit1-map .empty", state="detached")
    page.click("#cn-generate")
    page.wait_for_function("document.querySelector('#cn-info').innerText.includes('gallery')")
    page.wait_for_selector("#cn-images img")

    assert app.studio.gallery.count() == before + 2  # the map and the image
    item = app.studio.gallery.search("a white square in the center", page_size=1).items[0]
    assert item.technique == "controlnet" and (item.width, item.height) == (64, 64)
    stored_map = app.studio.gallery.get(item.parent_id)
    assert stored_map.technique == "control map" and (stored_map.width, stored_map.height) == (64, 64)
    assert item.settings["units"][0]["map_id"] == stored_map.id
    assert item.settings["units"][0]["model"] == str(tiny_controlnet)
    info = page.inner_text("#cn-info")
    assert f"gallery ids {item.id}" in info and f"child of map #{stored_map.id}" in info
    assert page.locator("#cn-images img").count() == 2  # the image, then its map

    # A map of the wrong size, used as it is (preprocessor none): a clear message, nothing stored.
    page.locator("#cn-unit1-image input[type=file]").set_input_files(str(small))
    page.wait_for_selector("#cn-unit1-map .empty")  # a new picture empties the map box
    pick_option(page, "#cn-unit1-preprocessor", "none (the image is the map)")
    page.click("#cn-generate")
    toast(page, "control map 1 is 48×40").first.wait_for()
    assert app.studio.gallery.count() == before + 2

    page.wait_for_function("window.__uploads === 0")
    page.screenshot(path=str(tmp_path / "controlnet.png"), full_page=True)
    shutil.copyfile(tmp_path / "controlnet.png", "/tmp/e2e-controlnet.png")
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


# ---------------------------------------------------------------- the IP-Adapter tab


def test_ip_adapter_tab_follows_an_uploaded_reference(page, app, tmp_path, capfd):
    """A purple triangle as the reference and a prompt naming only a place: the toy adapter
    draws a purple triangle there (judge), stored as the reference's child."""
    from PIL import Image

    from studio.toyworld import judge
    from studio.toyworld.render import render
    from studio.toyworld.world import Scene, Shape

    if app.model != "toy-sd":
        pytest.skip("needs the trained toy-sd and toy-ip-adapter")
    reference = tmp_path / "triangle.png"
    render(Scene("gray", (Shape("triangle", "purple", 32, 32, 26),))).save(reference)
    open_app(page, app.url)
    page.get_by_role("tab", name="IP-Adapter").click()
    page.wait_for_selector("#ipa-prompt textarea")
    page.locator("#ipa-prompt textarea").fill("a shape on the left")
    before = app.studio.gallery.count()

    page.click("#ipa-generate")  # no reference yet: a message, nothing stored
    toast(page, "IP-Adapter 1 has no reference picture").first.wait_for()
    assert app.studio.gallery.count() == before

    page.locator("#ipa-sampling").get_by_text("Sampling", exact=True).click()
    # by id: the label is shared with hidden seed fields of other tabs, and which one is last varies
    page.locator("#ipa-seed input").fill("4")
    page.locator("#ipa-unit1-references input[type=file]").set_input_files(str(reference))
    page.locator("#ipa-unit1-references").get_by_text("triangle.png").wait_for()
    page.click("#ipa-generate")
    page.wait_for_function("document.querySelector('#ipa-info').innerText.includes('gallery')")
    page.wait_for_selector("#ipa-images img")

    assert app.studio.gallery.count() == before + 2  # the reference and the image
    item = app.studio.gallery.search("a shape on the left", page_size=1).items[0]
    stored = app.studio.gallery.get(item.parent_id)
    assert item.technique == "ip_adapter" and stored.technique == "reference" and item.seed == 4
    assert item.settings["units"][0]["adapter"] == "toy-ip-adapter"
    assert item.settings["units"][0]["reference_ids"] == [stored.id]
    assert f"child of #{stored.id}" in page.inner_text("#ipa-info")
    with Image.open(item.image_path) as image:
        shapes = judge.read(image.convert("RGB")).shapes
    assert [(s.color, s.kind) for s in shapes] == [("purple", "triangle")], shapes
    assert shapes[0].cx < 32, shapes  # on the left
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


# ---------------------------------------------------------------- the Evaluation tab


def open_evaluation(page, url: str) -> None:
    open_app(page, url)
    page.get_by_role("tab", name="Evaluation").click()
    page.wait_for_selector("#eval-start")


def fill_evaluation(page, *, samples: int, steps: int, values: str) -> None:
    """Custom prompts, CLIP-Score and FID over guidance `values`."""
    metrics = page.locator("#eval-metrics")
    metrics.get_by_label("toy-geneval").uncheck()
    metrics.get_by_label("fid").check()
    page.locator("#eval-prompt-set").get_by_label("custom").check()
    page.locator("#eval-prompts textarea").fill("a red circle on the left\na blue square at the top")
    page.locator("#eval-values textarea, #eval-values input").first.fill(values)
    for box, value in (("#eval-samples", samples), ("#eval-steps", steps)):
        page.locator(f"{box} input").fill(str(value))
        page.locator(f"{box} input").press("Tab")


def eval_status(page) -> str:
    return page.inner_text("#eval-status")


def test_evaluation_tab_runs_a_job_with_progress_and_plots(page, app, tmp_path, capfd):
    open_evaluation(page, app.url)
    before = len(app.studio.gallery.evaluations())
    # 2 prompts × 8 seeds × 2 guidance values at 60 steps: seconds of work, so that a poll
    # lands while it runs.
    fill_evaluation(page, samples=8, steps=60, values="1, 5")
    page.click("#eval-start")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes('images generated')")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes(' done in ')")
    page.wait_for_function("document.querySelectorAll('#eval-plots img').length === 3")
    assert "100%" in page.inner_text("#eval-progress")
    evaluation = app.studio.gallery.evaluations()[0]
    assert len(app.studio.gallery.evaluations()) == before + 1
    assert f"evaluation #{evaluation.id}" in eval_status(page)
    assert "biased upward at small N" in page.inner_text("#eval-notes")  # FID over 16 samples a cell
    table = page.inner_text("#eval-table")
    assert "clip-score" in table and "fid" in table and app.model in table
    assert str(round(evaluation.results["clip-score"][app.model]["5"], 2))[:4] in table
    page.screenshot(path=str(tmp_path / "evaluation.png"), full_page=True)
    shutil.copyfile(tmp_path / "evaluation.png", "/tmp/e2e-evaluation.png")

    # A page opened later shows the finished job and lists the run among past evaluations.
    open_evaluation(page, app.url)
    page.wait_for_function(
        "(id) => document.querySelector('#eval-status').innerText.includes('evaluation #' + id)",
        arg=evaluation.id,
    )
    page.wait_for_selector("#eval-plots img")
    assert "clip-score, fid" in page.inner_text("#eval-past")
    # Picking it there brings back its settings.
    values = page.locator("#eval-values textarea, #eval-values input").first
    values.fill("2")
    page.locator("#eval-past [role=gridcell]").filter(has_text="clip-score, fid").first.click()
    page.wait_for_function(
        "(id) => document.querySelector('#eval-status').innerText.includes('Evaluation #' + id)",
        arg=evaluation.id,
    )
    page.get_by_role("button", name="Load the picked evaluation's settings").click()
    page.wait_for_function("(el) => el.value === '1, 5'", arg=values.element_handle())
    assert page.locator("#eval-samples input").input_value() == "8"
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_evaluation_tab_cancels_a_running_job(page, app, capfd):
    open_evaluation(page, app.url)
    before = (len(app.studio.gallery.evaluations()), app.studio.gallery.count())
    fill_evaluation(page, samples=16, steps=150, values="3")  # 32 images × 150 steps: long
    page.click("#eval-start")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes('images generated')")
    page.click("#eval-cancel")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes('cancelled')")
    job = app.studio.jobs.list("evaluation", 1)[0]
    assert job.status == "cancelled" and f"job #{job.id}" in eval_status(page)
    assert (len(app.studio.gallery.evaluations()), app.studio.gallery.count()) == before

    # Cancel with nothing running: a clear message.
    page.click("#eval-cancel")
    toast(page, "no evaluation is running").first.wait_for()
    assert page.errors == []
    assert server_tracebacks(capfd) == ""


def test_gallery_pictures_sent_to_evaluation_are_scored(page, app, capfd):
    import random

    from studio.toyworld.captions import sample_pair
    from studio.toyworld.render import render

    rng = random.Random(13)
    items = [
        app.studio.gallery.add(
            render(scene), technique="txt2img", model="toy-sd", prompt=caption, settings={}
        )
        for caption, scene in (sample_pair(rng) for _ in range(2))
    ]
    open_app(page, app.url)
    for item in items:  # each "Send to evaluation" adds its picture's id
        open_in_gallery(page, item.id, item.prompt)
        page.get_by_role("button", name="Send to evaluation").click()
        page.wait_for_function(
            "(id) => (document.querySelector('#eval-gallery-ids textarea, #eval-gallery-ids input')"
            "?.value || '').split(', ').includes(String(id))",
            arg=item.id,
        )
        # the app switches tabs on the same message: wait for it before clicking "Gallery" again
        page.get_by_role("tab", name="Evaluation", selected=True).wait_for()
    ids = page.locator("#eval-gallery-ids textarea, #eval-gallery-ids input").first.input_value()
    assert ids == f"{items[0].id}, {items[1].id}"
    assert page.locator("#eval-mode").get_by_label("gallery").is_checked()
    page.click("#eval-start")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes(' done in ')")
    evaluation = app.studio.gallery.evaluations()[0]
    assert evaluation.settings["gallery_ids"] == [items[0].id, items[1].id]
    assert evaluation.results["toy-geneval"] == 1.0 and evaluation.results["samples per cell"] == 2
    assert page.errors == []
    assert server_tracebacks(capfd) == ""
