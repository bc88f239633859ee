"""Tiled grounding on a 2,000-pixel synthetic mosaic with known objects, against one whole-image view.

    python scripts/tiled_demo.py [--checkpoint checkpoints/baby-geochat] [--tile 125] [--overlaps 0 31] [--out tiled.png]

The mosaic is 16 x 16 synthetic scenes of 125 pixels (geo.mosaic; --cells and --tile change that). Each row of the table is one way of
answering `[grounding] Describe the image in detail.` for the whole mosaic: one view of it (shrunk to the
model's input size), or tiles of --tile pixels with each --overlaps value (geo.tiling: boxes mapped to
mosaic pixels, duplicates merged). A predicted box matches a known object of its class when their
rotated IoU is >= 0.5 (greedy one-to-one, best pairs first); recall = matched / known objects, precision
= matched / predicted boxes, mean IoU over the matched pairs. --out draws the tiled answer of the last
overlap on the mosaic (never overwriting a file).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import sample  # noqa: E402
from boxes import match_boxes  # noqa: E402
from geo import tiling  # noqa: E402
from geo.labels import object_name  # noqa: E402
from geo.mosaic import make_mosaic  # noqa: E402

IOU_THRESHOLD = 0.5


def row(view: str, tiles: int, raw: int, predicted: list, known: list, seconds: float) -> dict:
    """One table row: counts, recall, precision and mean IoU of predicted against known."""
    matched = match_boxes(predicted, known, IOU_THRESHOLD)
    return {"view": view, "tiles": tiles, "boxes_before_merge": raw, "boxes": len(predicted), "matched": len(matched),
            "recall": len(matched) / len(known) if known else 0.0,
            "precision": len(matched) / len(predicted) if predicted else 0.0,
            "mean_iou": sum(m[0] for m in matched) / len(matched) if matched else 0.0, "seconds": seconds}


def print_table(rows: list, n_known: int):
    """The rows as a Markdown table."""
    print(f"\nknown objects: {n_known}; a match is the same class at rotated IoU >= {IOU_THRESHOLD}\n")
    print("| view | tiles | boxes before merge | boxes | matched | recall | precision | mean IoU (matched) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['view']} | {r['tiles']} | {r['boxes_before_merge']} | {r['boxes']} | {r['matched']} | {r['recall']:.3f} | "
              f"{r['precision']:.3f} | {r['mean_iou']:.3f} | {r['seconds']:.1f} |")


def main(argv=None):
    """Run the single view and the tiled views, print the table, draw the last tiled answer."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=sample.DEFAULT_CHECKPOINT, help="model directory")
    p.add_argument("--seed", type=int, default=0, help="mosaic seed")
    p.add_argument("--cells", type=int, default=16, help="the mosaic is cells x cells synthetic scenes of --tile pixels")
    p.add_argument("--tile", type=int, default=125, help="tile size in pixels, also the size of the mosaic's scenes")
    p.add_argument("--overlaps", type=int, nargs="+", default=[0, 31], help="tile overlaps to compare, in pixels")
    p.add_argument("--tile-batch", type=int, default=32, help="tiles per batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--out", type=Path, default=None, help="picture of the last tiled answer (e.g. tiled.png)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists():
        sys.exit(f"error: --out {args.out} already exists: it is never overwritten (remove it or choose another name)")
    for overlap in args.overlaps:
        if not 0 <= overlap <= args.tile // 2:
            sys.exit(f"error: --overlaps {overlap}: must be in [0, {args.tile // 2}] for --tile {args.tile}")
    device = sample.pick_device(args.device)
    try:
        engine = sample.load(args.checkpoint, device, sample.DTYPES[sample.default_dtype(device)])
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    mosaic, objects = make_mosaic(args.seed, args.cells, args.tile)
    known = [(o.name, o.polygon) for o in objects]
    question = data.IMAGE_PLACEHOLDER + "\n" + data.task_prompt("grounding")
    answer_tiles = tiling.engine_answerer(engine, question)
    rows = []

    start = time.perf_counter()
    whole = answer_tiles([mosaic])[0]
    records = sample.box_records(whole, *mosaic.size)
    predicted = [(object_name(r["label"] or ""), r["polygon"]) for r in records]
    rows.append(row(f"one view ({mosaic.width} px shrunk to {engine.model.cfg.image_size})", 1, len(records), predicted, known,
                    time.perf_counter() - start))
    scene = None
    for overlap in args.overlaps:
        start = time.perf_counter()
        with torch.inference_mode():
            scene = tiling.tiled_answer(answer_tiles, mosaic, args.tile, overlap, "grounding", args.tile_batch)
        predicted = [(b.box.label or "", b.polygon) for b in scene.boxes]
        rows.append(row(f"tiles of {args.tile} px, overlap {overlap}", scene.tiles, scene.raw_boxes, predicted, known,
                        time.perf_counter() - start))
    print_table(rows, len(known))
    if args.out is not None and scene is not None:
        sample.draw_boxes(mosaic, sample.scene_records(scene)).save(args.out)
        print(f"\nwrote {args.out}: the tiled answer (overlap {args.overlaps[-1]}) drawn on the mosaic")


if __name__ == "__main__":
    main()
