"""Gallery benchmark: seed many rows, then time real adds, word search, filters and paging.

    python bench/bench_gallery.py [--rows 100000] [--adds 200] [--repeat 20] [--dir DIR]

Seeding uses ``Gallery._bulk_insert_rows`` (the same table and FTS triggers as ``add()``, but no
image files); the ``add()`` timings write real tiny PNGs. Prints per-operation milliseconds; no
timing is asserted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from studio.gallery import Gallery  # noqa: E402

WORDS = (
    "cat dog owl fox castle forest river mountain city street portrait landscape sunset dawn night "
    "neon cyberpunk watercolor oil painting sketch photo cinematic red blue green golden silver "
    "misty rainy snowy ancient futuristic tiny giant cozy dramatic soft sharp detailed minimal "
    "robot dragon knight wizard garden ocean desert island bridge tower lantern flower tree"
).split()
RARE_WORD = "quokka"
MODELS = ["sd15", "sdxl", "toy-sd", "dreamshaper", "sd3-medium"]
TECHNIQUES = ["txt2img", "img2img", "inpaint", "controlnet"]
SCHEDULERS = ["DDIM", "Euler a", "DPM++ 2M", "UniPC"]


def seed_rows(gallery: Gallery, rows: int, batch: int = 5_000) -> float:
    rng = random.Random(0)
    start_us = int((datetime.now(UTC) - timedelta(days=365)).timestamp() * 1e6)
    step_us = max(1, int(365 * 86_400 * 1e6) // max(rows, 1))
    t0 = time.perf_counter()
    for first in range(0, rows, batch):
        chunk = []
        for i in range(first, min(rows, first + batch)):
            words = rng.sample(WORDS, 8)
            if i % 1000 == 0:
                words.append(RARE_WORD)
            chunk.append(
                {
                    "technique": TECHNIQUES[i % len(TECHNIQUES)],
                    "model": MODELS[rng.randrange(len(MODELS))],
                    "prompt": ", ".join(words),
                    "negative_prompt": "blurry, lowres" if i % 3 else "",
                    "seed": rng.randrange(2**32),
                    "steps": 20 + i % 30,
                    "guidance": 7.5,
                    "width": 512,
                    "height": 512,
                    "scheduler": SCHEDULERS[i % len(SCHEDULERS)],
                    "settings": '{"technique": "txt2img"}',
                    "image_path": f"bulk-{i:08d}.png",
                    "sha256": "0" * 64,
                    "parent_id": None,
                    "duration_s": 1.0,
                    "created_at": start_us + i * step_us,
                    "favourite": i % 20 == 0,
                }
            )
        gallery._bulk_insert_rows(chunk)
    return time.perf_counter() - t0


def time_op(label: str, fn: Callable[[], object], repeat: int) -> None:
    samples = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - t0) * 1000)
    extra = f"  total={result.total}" if hasattr(result, "total") else ""
    print(
        f"  {label:<44} median {statistics.median(samples):8.2f} ms   "
        f"min {min(samples):8.2f}   max {max(samples):8.2f}{extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows to seed (default 100000)")
    parser.add_argument("--adds", type=int, default=200, help="real add() calls to time (default 200)")
    parser.add_argument("--repeat", type=int, default=20, help="repetitions per query (default 20)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        root = args.dir or Path(tmp)
        gallery = Gallery(root / "gallery.db", root / "images")
        t0 = time.perf_counter()
        gallery.open()
        print(f"open + migrate + reconcile: {(time.perf_counter() - t0) * 1000:.1f} ms")

        elapsed = seed_rows(gallery, args.rows)
        rate = args.rows / elapsed if elapsed else float("inf")
        print(
            f"seeded {args.rows:,} rows in {elapsed:.2f} s ({rate:,.0f} rows/s, {elapsed / max(args.rows, 1) * 1e6:.1f} µs/row)"
        )

        image = Image.new("RGB", (64, 64), (200, 40, 40))
        samples = []
        parent = None
        for i in range(args.adds):
            t0 = time.perf_counter()
            item = gallery.add(
                image,
                technique="txt2img",
                model="toy-sd",
                prompt=f"benchmark image {i}, a cat in a garden",
                negative_prompt="blurry",
                seed=i,
                steps=20,
                guidance=7.5,
                width=64,
                height=64,
                scheduler="DDIM",
                settings={"seed": i},
                parent_id=parent,
                tags=("bench",),
            )
            samples.append((time.perf_counter() - t0) * 1000)
            parent = item.id if i % 10 else None
        if samples:
            print(
                f"add() x{args.adds}: median {statistics.median(samples):.2f} ms, "
                f"mean {statistics.fmean(samples):.2f} ms, max {max(samples):.2f} ms"
            )
        print(f"rows now: {gallery.count():,}")

        since = datetime.now(UTC) - timedelta(days=30)
        print(f"queries (x{args.repeat}, page_size 24):")
        time_op("search('') newest page", lambda: gallery.search(), args.repeat)
        time_op("search('cat') common word", lambda: gallery.search("cat"), args.repeat)
        time_op(f"search('{RARE_WORD}') rare word", lambda: gallery.search(RARE_WORD), args.repeat)
        time_op(
            "search('cat garden sunset') 3 words", lambda: gallery.search("cat garden sunset"), args.repeat
        )
        time_op("search('zzzz') no match", lambda: gallery.search("zzzz"), args.repeat)
        time_op("search(model='sdxl')", lambda: gallery.search(model="sdxl"), args.repeat)
        time_op(
            "search('cat', model='sdxl', favourite=True)",
            lambda: gallery.search("cat", model="sdxl", favourite=True),
            args.repeat,
        )
        time_op(
            "search(technique='inpaint', since=30 days)",
            lambda: gallery.search(technique="inpaint", since=since),
            args.repeat,
        )
        time_op("search(tag='bench')", lambda: gallery.search(tag="bench"), args.repeat)
        time_op("search('') page 10", lambda: gallery.search(page=10), args.repeat)
        time_op("search('') page 1000", lambda: gallery.search(page=1000), args.repeat)
        time_op("search('cat') page 500", lambda: gallery.search("cat", page=500), args.repeat)
        time_op("search(model='sd15') page 500", lambda: gallery.search(model="sd15", page=500), args.repeat)
        time_op("get(id)", lambda: gallery.get(args.rows // 2), args.repeat)
        time_op("lineage(last add)", lambda: gallery.lineage(parent or 1), args.repeat)
        time_op("count()", gallery.count, args.repeat)
        time_op("models() + techniques()", lambda: (gallery.models(), gallery.techniques()), args.repeat)
        gallery.close()


if __name__ == "__main__":
    main()
