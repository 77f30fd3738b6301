"""Toy GenEval and toy-CLIP FID against guidance, for toy-sd and toy-sd3.

    python bench/bench_evaluation.py [--guidance 1 3 5 7 9] [--samples 27] [--per-category 12]
                                     [--plot bench/evaluation_guidance.png]

Runs `studio.evaluate` over guidance values with fixed seeds: toy GenEval (the judge on its
prompt set) and FID over the toy CLIP's image embeddings against 2,000 toy-world renders
(not Inception's FID). The full size, 27 seeds on each of the 78 prompts, gives 2,106 images
a cell, above FID's small-N bound (2,048); fewer seeds run faster but bias FID upward.
Prints the table, the notes and the wall time, and draws both curves side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "toy-sd": ROOT / "assets" / "models" / "toy-sd",
    "toy-sd3": ROOT / "assets" / "models" / "toy-sd3",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--guidance", nargs="+", default=["1", "3", "5", "7", "9"])
    parser.add_argument("--samples", type=int, default=27, help="seeds per prompt")
    parser.add_argument("--per-category", type=int, default=12, help="toy GenEval prompts per category")
    parser.add_argument("--plot", type=Path, default=Path("bench/evaluation_guidance.png"))
    args = parser.parse_args()

    from PIL import Image

    from studio.charts import line_chart
    from studio.evaluate import EvaluationSettings, image_count, results_table, run
    from studio.models import ModelManager

    models = []
    for name, folder in MODELS.items():
        if (folder / "model_index.json").is_file():
            models.append(str(folder))
        else:
            print(f"{name}: missing (no pipeline in {folder.relative_to(ROOT)})")
    settings = EvaluationSettings(
        metrics=("toy-geneval", "fid"),
        models=tuple(models),
        prompt_set="toy-geneval",
        values=tuple(args.guidance),
        samples=args.samples,
        per_category=args.per_category,
    )
    per_cell = image_count(settings) // (len(models) * len(args.guidance))
    print(
        f"size: {args.per_category} prompts a category, {args.samples} seeds a prompt: "
        f"{per_cell} images a cell, {image_count(settings)} in all"
    )
    started = time.perf_counter()
    report = run(settings, ModelManager())
    wall = time.perf_counter() - started

    names = {str(folder): name for name, folder in MODELS.items()}
    headers, rows = results_table(settings.to_dict(), report.results())
    rows = [[names.get(row[0], row[0]), *row[1:]] for row in rows]
    seconds = [cell.seconds for cell in report.cells]
    print(" | ".join(f"{h:>14}" for h in [*headers, "seconds"]))
    for row, s in zip(rows, seconds, strict=True):
        print(" | ".join(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}" for v in [*row, s]))
    for note in report.notes:
        print(f"note: {note}")
    print(f"wall time: {wall:.1f} s for {len(report.cells)} cells ({report.seconds:.1f} s in evaluate.run)")

    charts = []
    for metric in settings.metrics:
        series = {
            names[model]: [(float(c.value), c.scores[metric]) for c in report.cells if c.model == model]
            for model in models
        }
        charts.append(line_chart(series, "guidance", metric))
    sheet = Image.new("RGB", (sum(c.width for c in charts), max(c.height for c in charts)), "white")
    for i, chart in enumerate(charts):
        sheet.paste(chart, (i * chart.width, 0))
    sheet.save(args.plot)
    print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
