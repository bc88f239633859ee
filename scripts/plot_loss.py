"""Draw a training loss curve from train.py's metrics.jsonl as a PNG (Pillow only, no matplotlib).

    python scripts/plot_loss.py runs/baby/metrics.jsonl docs/baby_loss.png
    python scripts/plot_loss.py runs/stage1/metrics.jsonl runs/stage2/metrics.jsonl docs/baby_loss.png
    python scripts/plot_loss.py --first-stage 2 reading/metrics.jsonl all/metrics.jsonl docs/baby_loss.png

Several files are stages of one recipe: drawn one after the other, a dashed line where each begins, labelled with
the stage's number counted from --first-stage (the number of the first file's stage). A missing, malformed or short
file is one line and exit code 2.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 900, 420, 60


def moving_average(values: list, window: int) -> list:
    """Trailing mean over `window` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(steps: list, losses: list, title: str, stage_starts: tuple = (), first_stage: int = 1) -> Image.Image:
    """A line chart of loss against step, raw in light grey and smoothed in blue, log-scaled y axis."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = math.log10(min(losses)), math.log10(max(losses))
    lo, hi = math.floor(lo * 4) / 4, math.ceil(hi * 4) / 4
    x_of = lambda s: MARGIN + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (WIDTH - 2 * MARGIN)  # noqa: E731
    y_of = lambda v: HEIGHT - MARGIN - (math.log10(v) - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)  # noqa: E731
    draw.rectangle((MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN), outline="black")
    for k in range(int(lo * 4), int(hi * 4) + 1):
        value = 10 ** (k / 4)
        y = y_of(value)
        draw.line((MARGIN, y, WIDTH - MARGIN, y), fill="#e5e5e5")
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    for i in range(6):
        s = steps[0] + (steps[-1] - steps[0]) * i / 5
        draw.text((x_of(s) - 12, HEIGHT - MARGIN + 8), f"{int(s)}", fill="black")
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps, losses)], fill="#c8c8c8", width=1)
    smooth = moving_average(losses, max(1, len(losses) // 50))
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps, smooth)], fill="#1f5fbf", width=2)
    for k, s in enumerate(stage_starts):
        x = x_of(s)
        for y in range(MARGIN, HEIGHT - MARGIN, 8):
            draw.line((x, y, x, y + 4), fill="#d04040")
        draw.text((x + 4, MARGIN + 4), f"stage {first_stage + k + 1}", fill="#d04040")
    draw.text((MARGIN, 20), title, fill="black")
    draw.text((WIDTH // 2 - 20, HEIGHT - 25), "step", fill="black")
    return img


def build_parser() -> argparse.ArgumentParser:
    """The command line: metrics files in stage order, the PNG, a title and the first stage's number."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path, nargs="+", help="train.py's metrics.jsonl, one per stage, in order")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--title", default="training loss (per step, log scale; blue: moving average)")
    p.add_argument("--first-stage", type=int, default=1, help="the number of the first file's stage (labels count on)")
    return p


def main(argv=None) -> int:
    """Read the metrics.jsonl files (stages in order), write the PNG; 2 on a missing, malformed or short file."""
    args = build_parser().parse_args(argv)
    steps, losses, starts = [], [], []
    for path in args.metrics:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows = [(int(r["step"]), float(r["loss"])) for r in rows]
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: {path}: not train.py's metrics.jsonl ({e})", file=sys.stderr)
            return 2
        if len(rows) < 2:
            print(f"error: {path} holds fewer than two steps", file=sys.stderr)
            return 2
        offset = steps[-1] if steps else 0
        if steps:
            starts.append(offset + rows[0][0])
        steps += [offset + step for step, _ in rows]
        losses += [loss for _, loss in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(steps, losses, args.title, tuple(starts), args.first_stage).save(args.out)
    print(f"wrote {args.out} ({len(steps)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
