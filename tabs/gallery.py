"""The Gallery tab: browse, search, inspect, tag, restore, delete and import generated images.

UI only: every action goes through ``studio.gallery`` (see :mod:`studio.gallery`), which
returns plain dataclasses. Nothing here imports torch or diffusers, and nothing happens at
import time.

``build(studio, bus)`` renders the tab inside the caller's current Blocks/Tab and returns a
:class:`GalleryTab`. To refresh the page list when the tab is selected, the app does either::

    gallery_tab.refresh_on(tab.select)          # inside the app's Blocks context
    # or, equivalently
    tab.select(gallery_tab.tab_refresh_fn, gallery_tab.tab_refresh_inputs,
               gallery_tab.tab_refresh_outputs, concurrency_limit=None, api_visibility="private")

(``gallery_tab.refresh_button.click()`` from outside works too: it is a visible "Refresh" button.)
The images are served from ``studio.paths.images``: launch with ``**tabs.launch.launch_options(studio)``.

Public API endpoints (for ``gradio_client``; none uses the GPU lane):

* ``/gallery_search(query="", model="", technique="", favourite_only=False, since="", until="",
  page=1, page_size=24) -> (items: list[dict], total: int)`` -- ``page`` is 1-based, ``since`` /
  ``until`` are ``YYYY-MM-DD`` (UTC, both days included), empty strings mean "no filter"; each
  item is ``{id, prompt, model, technique, seed, created_at (ISO 8601), image_path, favourite}``.
* ``/gallery_item(id) -> dict`` -- ``{id, technique, model, prompt, negative_prompt, seed, steps,
  guidance, width, height, scheduler, parent_id, created_at, sha256, favourite, tags,
  image_path, settings}``; ``settings`` is the stored settings dict that remakes the image.
* ``/gallery_delete(id) -> dict`` -- ``{"deleted": id, "total": images left}``; row and file go.
* ``/gallery_favourite(id, favourite) -> dict`` -- the item's summary (as in search).
* ``/gallery_import(file) -> dict`` -- the imported item's summary; ``file`` is a ``.png``
  (``gradio_client.handle_file(path)``).

User mistakes come back as ``gr.Error`` with one sentence (``AppError`` in gradio_client).
"""

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import gradio as gr
import sqlalchemy as sa

from tabs.common import TAB_IDS, Bus, bus_message, make_bus, user_errors

__all__ = [
    "PAGE_SIZE",
    "GalleryActions",
    "GalleryTab",
    "build",
    "item_details",
    "item_summary",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 24  # 6 columns x 4 rows
MAX_API_PAGE_SIZE = 200
_MAX_ID = 2**63 - 1
_MAX_DATE_CHARS = 40
_ALL = ""  # dropdown value meaning "no filter"
_NO_SELECTION = "Select an image first."


# --------------------------------------------------------------------------------------------
# Plain helpers (no components)
# --------------------------------------------------------------------------------------------


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds")


def item_summary(item: Any) -> dict[str, Any]:
    """The JSON-able summary of a :class:`studio.gallery.GalleryItem` used by the search API."""
    return {
        "id": item.id,
        "prompt": item.prompt,
        "model": item.model,
        "technique": item.technique,
        "seed": item.seed,
        "created_at": _iso(item.created_at),
        "image_path": item.image_path,
        "favourite": item.favourite,
    }


def item_details(item: Any) -> dict[str, Any]:
    """Everything about one item, as shown in the settings panel and returned by ``gallery_item``."""
    return {
        "id": item.id,
        "technique": item.technique,
        "model": item.model,
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt,
        "seed": item.seed,
        "steps": item.steps,
        "guidance": item.guidance,
        "width": item.width,
        "height": item.height,
        "scheduler": item.scheduler,
        "parent_id": item.parent_id,
        "created_at": _iso(item.created_at),
        "sha256": item.sha256,
        "favourite": item.favourite,
        "tags": list(item.tags),
        "image_path": item.image_path,
        "settings": item.settings,
    }


def _error(message: str) -> gr.Error:
    return gr.Error(message, print_exception=False)


def _safe(fn: Callable) -> Callable:
    """``user_errors`` plus a clear sentence when the database itself is busy or unreadable."""
    guarded = user_errors(fn)

    @functools.wraps(guarded)
    def wrapper(*args, **kwargs):
        try:
            return guarded(*args, **kwargs)
        except gr.Error:
            raise
        except (sa.exc.OperationalError, sa.exc.DatabaseError, OSError) as exc:
            log.exception("gallery action %s failed", getattr(fn, "__name__", fn))
            raise _error(f"The gallery is unavailable right now ({type(exc).__name__}); try again.") from None

    return wrapper


def _as_id(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error("An image id must be a whole number.")
    if not 1 <= value <= _MAX_ID:
        raise _error(f"There is no image with id {value} in the gallery.")
    return value


def _as_page(value: Any) -> int:
    if value is None or value == "":
        return 1
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _error("The page number must be a whole number of 1 or more.")
    return min(value, 10_000_000)


def _as_filter(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _error(f"The {name} filter must be text.")
    value = value.strip()
    return value or None


def _as_bool(name: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _error(f"{name} must be true or false.")
    return value


def parse_day(name: str, text: Any) -> datetime | None:
    """``'YYYY-MM-DD'`` -> midnight UTC of that day; empty -> ``None``; anything else -> gr.Error."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise _error(f"The '{name}' date must be text written YYYY-MM-DD, e.g. 2024-05-31.")
    text = text.strip()
    if not text:
        return None
    shown = text if len(text) <= _MAX_DATE_CHARS else text[:_MAX_DATE_CHARS] + "…"
    try:
        if len(text) != 10:
            raise ValueError(text)
        day = datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise _error(
            f"The '{name}' date {shown!r} is not a real date written YYYY-MM-DD, e.g. 2024-05-31."
        ) from None
    return day.replace(tzinfo=UTC)


def _existing(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False


def _caption(item: Any) -> str:
    prompt = " ".join(item.prompt.split())
    if len(prompt) > 60:
        prompt = prompt[:59] + "…"
    star = "★ " if item.favourite else ""
    return f"{star}#{item.id} {prompt}".strip()


def _thumbs(items: Sequence[Any]) -> tuple[list[tuple[str, str]], list[int]]:
    """Gallery value (path, caption) and the matching ids, skipping files gone from disk."""
    shown = [item for item in items if _existing(item.image_path)]
    return [(item.image_path, _caption(item)) for item in shown], [item.id for item in shown]


def _total_text(total: int, page: int, pages: int) -> str:
    if total == 0:
        return "No images match."
    noun = "image" if total == 1 else "images"
    return f"**{total:,}** {noun} · page {page} of {pages}"


# --------------------------------------------------------------------------------------------
# Actions: plain functions over the Studio, shared by the UI events and the API endpoints
# --------------------------------------------------------------------------------------------


class GalleryActions:
    """What the tab does, without components (so it can be tested and reused directly)."""

    def __init__(self, studio: Any) -> None:
        self.studio = studio

    @property
    def gallery(self):
        return self.studio.gallery

    def search(
        self,
        query: Any = "",
        model: Any = "",
        technique: Any = "",
        favourite_only: Any = False,
        since: Any = "",
        until: Any = "",
        page: Any = 1,
        page_size: Any = PAGE_SIZE,
    ):
        """One page (1-based) of items; returns the gallery's ``Page`` (whose ``page`` is 0-based)."""
        if query is None:
            query = ""
        if not isinstance(query, str):
            raise _error("The search text must be text.")
        since_day = parse_day("since", since)
        until_day = parse_day("until", until)
        if since_day and until_day and since_day > until_day:
            raise _error("The 'since' date is after the 'until' date.")
        if (
            isinstance(page_size, bool)
            or not isinstance(page_size, int)
            or not 1 <= page_size <= MAX_API_PAGE_SIZE
        ):
            raise _error(f"The page size must be a whole number from 1 to {MAX_API_PAGE_SIZE}.")
        return self.gallery.search(
            query,
            model=_as_filter("model", model),
            technique=_as_filter("technique", technique),
            favourite=True if _as_bool("Favourites only", favourite_only) else None,
            since=since_day,
            until=None if until_day is None else until_day + timedelta(days=1),  # 'until' day included
            page=_as_page(page) - 1,
            page_size=page_size,
        )

    def get(self, item_id: Any):
        item_id = _as_id(item_id)
        item = self.gallery.get(item_id)
        if item is None:
            raise _error(f"There is no image with id {item_id} in the gallery.")
        return item

    def set_favourite(self, item_id: Any, favourite: Any):
        return self.gallery.set_favourite(_as_id(item_id), _as_bool("Favourite", favourite))

    def set_tags(self, item_id: Any, text: Any):
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise _error("Tags must be text, separated by commas.")
        return self.gallery.set_tags(_as_id(item_id), [tag.strip() for tag in text.split(",")])

    def delete(self, item_id: Any) -> int:
        item_id = _as_id(item_id)
        self.gallery.delete(item_id)
        return item_id

    def import_png(self, path: Any):
        if not path:
            raise _error("Choose a .png file to import.")
        path = str(path)
        if not path.lower().endswith(".png"):
            raise _error("Only .png files can be imported.")
        return self.gallery.import_png(path)

    def restore_message(self, item_id: Any) -> dict:
        """The bus message that restores an item's settings in the tab of its technique."""
        item = self.get(item_id)
        target = TAB_IDS.get(item.technique)
        if target in (None, "gallery") and isinstance(item.settings.get("technique"), str):
            target = TAB_IDS.get(item.settings["technique"])
        if target in (None, "gallery"):
            target = "txt2img"
        return bus_message(target=target, settings=item.settings, image_id=item.id)

    def send_message(self, item_id: Any, target: str) -> dict:
        item = self.get(item_id)
        return bus_message(target=target, settings=None, image_id=item.id)


# --------------------------------------------------------------------------------------------
# The tab
# --------------------------------------------------------------------------------------------


@dataclass
class GalleryTab:
    """What :func:`build` returns.

    * ``tab_refresh_fn`` / ``tab_refresh_inputs`` / ``tab_refresh_outputs``: reload the current
      page with the current filters and refresh the model/technique choices; wire it to the
      tab's ``select`` (or call :meth:`refresh_on`).
    * ``refresh_button``: the visible "Refresh" button doing the same on click.
    * ``grid``: the page's ``gr.Gallery``; ``selected_id``: ``gr.State`` with the selected id.
    * ``actions``: the :class:`GalleryActions` the events use.
    """

    tab_refresh_fn: Callable
    tab_refresh_inputs: list
    tab_refresh_outputs: list
    refresh_button: gr.Button
    grid: gr.Gallery
    selected_id: gr.State
    actions: GalleryActions

    def refresh_on(self, *triggers):
        """Refresh on the given triggers, e.g. ``refresh_on(tab.select)`` (needs a Blocks context)."""
        return gr.on(
            triggers=list(triggers),
            fn=self.tab_refresh_fn,
            inputs=self.tab_refresh_inputs,
            outputs=self.tab_refresh_outputs,
            concurrency_limit=None,
            api_visibility="private",
            show_progress="hidden",
        )


def build(
    studio: Any, bus: Bus, *, refresh_on_load: bool = True, send_targets: Sequence[tuple[str, str]] = ()
) -> GalleryTab:
    """Render the gallery tab in the current Blocks/Tab context and wire its events.

    With ``refresh_on_load`` the first page is also loaded when the browser page loads.
    ``send_targets`` lists (label, tab id) of the app's tabs that take an image, one
    "Send to" button each.
    """
    actions = GalleryActions(studio)
    quick = {"concurrency_limit": None, "api_visibility": "private"}

    # ---- layout -------------------------------------------------------------------------
    with gr.Row(equal_height=True):
        query = gr.Textbox(
            label="Search prompts", placeholder="words in the prompt…", scale=3, max_length=1000
        )
        model = gr.Dropdown(choices=[("All models", _ALL)], value=_ALL, label="Model", scale=2)
        technique = gr.Dropdown(choices=[("All techniques", _ALL)], value=_ALL, label="Technique", scale=1)
    with gr.Row(equal_height=True):
        since = gr.Textbox(label="Since (YYYY-MM-DD)", placeholder="2024-01-31", max_length=64, scale=1)
        until = gr.Textbox(label="Until (YYYY-MM-DD)", placeholder="2024-12-31", max_length=64, scale=1)
        favourite_only = gr.Checkbox(label="Favourites only", value=False, scale=1)
        search_button = gr.Button("Search", variant="primary", scale=1)
        refresh_button = gr.Button("Refresh", scale=1)
    with gr.Row(equal_height=True):
        prev_button = gr.Button("◀ Previous", size="sm", scale=1)
        page_number = gr.Number(value=1, precision=0, minimum=1, label="Page", scale=1)
        next_button = gr.Button("Next ▶", size="sm", scale=1)
        total_text = gr.Markdown("", scale=3)
    grid = gr.Gallery(
        format="png",
        columns=6,
        label="Images",
        type="filepath",
        interactive=False,
        allow_preview=False,
        object_fit="contain",
        height="auto",
    )
    page_ids = gr.State([])
    selected_id = gr.State(None)
    parent_ids = gr.State([])
    child_ids = gr.State([])

    with gr.Row():
        with gr.Column(scale=3):
            big_image = gr.Image(
                label="Selected image",
                type="filepath",
                format="png",
                interactive=False,
                buttons=["download", "fullscreen"],
            )
            parents = gr.Gallery(
                label="Parent chain (oldest first) — click to open",
                format="png",
                columns=8,
                height=160,
                type="filepath",
                interactive=False,
                allow_preview=False,
            )
            children = gr.Gallery(
                label="Children — click to open",
                format="png",
                columns=8,
                height=160,
                type="filepath",
                interactive=False,
                allow_preview=False,
            )
        with gr.Column(scale=2):
            favourite = gr.Checkbox(label="★ Favourite", value=False)
            with gr.Row(equal_height=True):
                tags = gr.Textbox(label="Tags (comma-separated)", max_length=4000, scale=3)
                save_tags = gr.Button("Save tags", scale=1)
            with gr.Row():
                restore_button = gr.Button("Restore settings", variant="primary")
                delete_button = gr.Button("Delete", variant="stop")
            with gr.Row():
                # (label, tab id) of the tabs the app has that take an image
                send_buttons = [
                    (gr.Button(f"Send to {label}", size="sm"), tab) for label, tab in send_targets
                ]
            details = gr.JSON(label="Settings", value=None)
            import_file = gr.File(
                label="Import PNG", file_types=[".png"], type="filepath", file_count="single"
            )
    api_button = gr.Button(visible=False)
    api_result = gr.JSON(visible=False)

    filters = [query, model, technique, favourite_only, since, until]
    page_outputs = [grid, page_number, total_text, page_ids]
    detail_outputs = [
        big_image,
        details,
        favourite,
        tags,
        parents,
        children,
        selected_id,
        parent_ids,
        child_ids,
    ]
    refresh_outputs = [*page_outputs, model, technique]

    # ---- event functions ------------------------------------------------------------------

    def load_page(q, m, t, fav, s, u, page, clamp: bool = True):
        result = actions.search(q, m, t, fav, s, u, page)
        page = result.page + 1
        if clamp and not result.items and result.total and page > result.pages:
            page = result.pages  # e.g. the last image of the last page was deleted
            result = actions.search(q, m, t, fav, s, u, page)
        value, ids = _thumbs(result.items)
        return value, page, _total_text(result.total, page, result.pages), ids

    def choices(current: Any, values: list[str], everything: str):
        options = [(everything, _ALL)] + [(v or "(none)", v) for v in values if v != _ALL]
        keep = current if isinstance(current, str) and current in values else _ALL
        return gr.update(choices=options, value=keep)

    @_safe
    def search_first_page(q, m, t, fav, s, u):
        return load_page(q, m, t, fav, s, u, 1)

    @_safe
    def go_to_page(q, m, t, fav, s, u, page):
        return load_page(q, m, t, fav, s, u, page)

    def step_page(delta: int):
        @_safe
        def step(q, m, t, fav, s, u, page):
            try:
                current = _as_page(page)
            except gr.Error:
                current = 1
            return load_page(q, m, t, fav, s, u, max(1, current + delta))

        return step

    @_safe
    def refresh(q, m, t, fav, s, u, page):
        m_update = choices(m, actions.gallery.models(), "All models")
        t_update = choices(t, actions.gallery.techniques(), "All techniques")
        m = m_update["value"]
        t = t_update["value"]
        try:
            page_values = load_page(q, m, t, fav, s, u, page)
        except gr.Error:
            page_values = load_page(q, m, t, fav, "", "", 1)  # bad filters: still show something
        return (*page_values, m_update, t_update)

    @_safe
    def refresh_defaults():
        return refresh("", _ALL, _ALL, False, "", "", 1)

    def detail_values(item: Any):
        ancestors, kids = actions.gallery.lineage(item.id)
        parent_value, parent_list = _thumbs(ancestors)
        child_value, child_list = _thumbs(kids)
        return (
            item.image_path if _existing(item.image_path) else None,
            item_details(item),
            item.favourite,
            ", ".join(item.tags),
            parent_value,
            child_value,
            item.id,
            parent_list,
            child_list,
        )

    empty_detail = (None, None, False, "", [], [], None, [], [])

    def show_from(ids: Any, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else None
        if not isinstance(ids, list) or index is None or not 0 <= index < len(ids):
            raise _error("That image is no longer on this page; refresh the page.")
        item = actions.gallery.get(_as_id(ids[index]))
        if item is None:
            raise _error("That image is no longer in the gallery; refresh the page.")
        return detail_values(item)

    show_selected = _safe(show_from)

    @_safe
    def toggle_favourite(item_id, value):
        if item_id is None:
            raise _error(_NO_SELECTION)
        item = actions.set_favourite(item_id, bool(value))
        return item_details(item)

    @_safe
    def save_item_tags(item_id, text):
        if item_id is None:
            raise _error(_NO_SELECTION)
        item = actions.set_tags(item_id, text)
        gr.Info(f"Saved {len(item.tags)} tag(s) for image #{item.id}.")
        return ", ".join(item.tags), item_details(item)

    @_safe
    def restore(item_id):
        if item_id is None:
            raise _error(_NO_SELECTION)
        return actions.restore_message(item_id)

    def sender(target: str):
        @_safe
        def send(item_id):
            if item_id is None:
                raise _error(_NO_SELECTION)
            return actions.send_message(item_id, target)

        return send

    @_safe
    def delete_selected(item_id, q, m, t, fav, s, u, page):
        if item_id is None:
            raise _error(_NO_SELECTION)
        deleted = actions.delete(item_id)
        gr.Info(f"Deleted image #{deleted}.")
        try:
            page_values = load_page(q, m, t, fav, s, u, page)
        except gr.Error:
            page_values = load_page("", _ALL, _ALL, False, "", "", 1)
        return (*page_values, *empty_detail)

    @_safe
    def import_upload(path, q, m, t, fav, s, u):
        item = actions.import_png(path)
        gr.Info(f"Imported image #{item.id}.")
        try:
            page_values = load_page(q, m, t, fav, s, u, 1)
        except gr.Error:
            page_values = load_page("", _ALL, _ALL, False, "", "", 1)
        return (None, *page_values, *detail_values(item))

    # ---- API endpoints (typed; JSON in, JSON out) ------------------------------------------

    @_safe
    def gallery_search(
        query: str = "",
        model: str = "",
        technique: str = "",
        favourite_only: bool = False,
        since: str = "",
        until: str = "",
        page: int = 1,
        page_size: int = PAGE_SIZE,
    ) -> tuple[list[dict], int]:
        """Search prompts (all words must match) with optional filters; page is 1-based and dates
        are YYYY-MM-DD (UTC, both included). Returns (items, total number of matches)."""
        result = actions.search(query, model, technique, favourite_only, since, until, page, page_size)
        return [item_summary(item) for item in result.items], result.total

    @_safe
    def gallery_item(id: int) -> dict:  # noqa: A002 - the API parameter is called "id"
        """Everything about one image, including the settings dict that remakes it."""
        return item_details(actions.get(id))

    @_safe
    def gallery_delete(id: int) -> dict:  # noqa: A002
        """Delete an image's row and file together. Returns {"deleted": id, "total": images left}."""
        deleted = actions.delete(id)
        return {"deleted": deleted, "total": actions.gallery.count()}

    @_safe
    def gallery_favourite(id: int, favourite: bool) -> dict:  # noqa: A002
        """Mark or unmark an image as a favourite. Returns the image's summary."""
        return item_summary(actions.set_favourite(id, favourite))

    @_safe
    def gallery_import(file):
        """Import a PNG with generation metadata (ours or AUTOMATIC1111's). Returns its summary."""
        return item_summary(actions.import_png(file))

    # ---- wiring ----------------------------------------------------------------------------

    page_inputs = [*filters, page_number]
    for trigger in (search_button.click, query.submit, since.submit, until.submit):
        trigger(search_first_page, filters, page_outputs, show_progress="minimal", **quick)
    for control in (model, technique, favourite_only):
        control.input(search_first_page, filters, page_outputs, show_progress="minimal", **quick)
    page_number.submit(go_to_page, page_inputs, page_outputs, show_progress="minimal", **quick)
    prev_button.click(step_page(-1), page_inputs, page_outputs, show_progress="minimal", **quick)
    next_button.click(step_page(+1), page_inputs, page_outputs, show_progress="minimal", **quick)
    refresh_button.click(refresh, page_inputs, refresh_outputs, show_progress="minimal", **quick)
    if refresh_on_load:
        gr.on(None, refresh_defaults, None, refresh_outputs, show_progress="hidden", **quick)

    grid.select(show_selected, [page_ids], detail_outputs, show_progress="hidden", **quick)
    parents.select(show_selected, [parent_ids], detail_outputs, show_progress="hidden", **quick)
    children.select(show_selected, [child_ids], detail_outputs, show_progress="hidden", **quick)

    favourite.input(toggle_favourite, [selected_id, favourite], [details], show_progress="hidden", **quick)
    save_tags.click(save_item_tags, [selected_id, tags], [tags, details], **quick)
    tags.submit(save_item_tags, [selected_id, tags], [tags, details], **quick)
    restore_button.click(restore, [selected_id], [bus.message], **quick)
    for button, tab in send_buttons:
        button.click(sender(tab), [selected_id], [bus.message], **quick)
    delete_button.click(
        delete_selected, [selected_id, *page_inputs], [*page_outputs, *detail_outputs], **quick
    )
    import_file.upload(
        import_upload, [import_file, *filters], [import_file, *page_outputs, *detail_outputs], **quick
    )

    api = {"concurrency_limit": None, "api_visibility": "public"}
    gr.api(gallery_search, api_name="gallery_search", **api)
    gr.api(gallery_item, api_name="gallery_item", **api)
    gr.api(gallery_delete, api_name="gallery_delete", **api)
    gr.api(gallery_favourite, api_name="gallery_favourite", **api)
    api_button.click(gallery_import, [import_file], [api_result], api_name="gallery_import", **api)

    return GalleryTab(
        tab_refresh_fn=refresh,
        tab_refresh_inputs=page_inputs,
        tab_refresh_outputs=refresh_outputs,
        refresh_button=refresh_button,
        grid=grid,
        selected_id=selected_id,
        actions=actions,
    )


def main() -> None:  # pragma: no cover - manual entry point
    from studio.service import Studio

    studio = Studio()
    with gr.Blocks(title="Latent Studio — Gallery") as demo:
        bus = make_bus()
        build(studio, bus)
    from .launch import launch_options

    demo.queue()
    demo.launch(**launch_options(studio))


if __name__ == "__main__":
    main()
