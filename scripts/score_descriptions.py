"""Grounded descriptions of a synthetic dataset's held-out scenes, scored box by box against the generator's objects.

    python scripts/score_descriptions.py --checkpoint checkpoints/baby-geochat --data runs/baby-work/data [--n 300]

Asks every held-out scene (`test_*` in the dataset's annotations.jsonl, written by `synthetic/prepare.py scenes`)
the question `sample.py --task grounding` asks, greedy, and prints: descriptions that name the scene's ground,
descriptions equal to the generator's, and the drawn boxes matched one to one to a known object at rotated IoU >= 0.5,
once requiring the class their phrase names (recall over the known objects, precision over the drawn boxes) and once
ignoring it (a box on some object). GeoChat-Bench has no such bench; this is Baby GeoChat's goal "every drawn box on
one of the named objects" (README), measured over the held-out scenes instead of three pictures.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import sample  # noqa: E402
from boxes import box_polygon_grid, match_boxes, parse_boxes  # noqa: E402
from diagnose_baby import read_annotations  # noqa: E402
from geo.labels import object_name  # noqa: E402
from synthetic.scenes import description_head, grounded_description  # noqa: E402


def score(answers: list, anns: list) -> dict:
    """Counts over (answer, annotation) pairs: ground named, exact, boxes, matches with and without the class."""
    totals = {"scenes": len(anns), "ground_named": 0, "exact": 0, "objects": 0, "boxes": 0, "matched": 0,
              "matched_any_class": 0}
    for answer, ann in zip(answers, anns, strict=True):
        totals["ground_named"] += description_head(ann["scene"]) in answer
        totals["exact"] += answer.strip() == grounded_description(ann)
        known = [(o["class"], box_polygon_grid(parse_boxes(o["box"])[0])) for o in ann["objects"]]
        drawn = [(object_name(b.label or ""), box_polygon_grid(b)) for b in parse_boxes(answer)]
        totals["objects"] += len(known)
        totals["boxes"] += len(drawn)
        totals["matched"] += len(match_boxes(drawn, known))
        totals["matched_any_class"] += len(match_boxes([("", p) for _, p in drawn], [("", p) for _, p in known]))
    totals["recall"] = totals["matched"] / totals["objects"] if totals["objects"] else 0.0
    totals["precision"] = totals["matched"] / totals["boxes"] if totals["boxes"] else 0.0
    return totals


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=sample.DEFAULT_CHECKPOINT, help="model directory")
    p.add_argument("--data", type=Path, required=True, help="a dataset written by synthetic/prepare.py scenes")
    p.add_argument("--n", type=int, default=-1, help="the first n held-out scenes (all when < 0)")
    p.add_argument("--batch-size", type=int, default=50, help="scenes per generate call")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", action="store_true", help="print the scores as one JSON line")
    return p


def main(argv=None) -> int:
    """Describe the held-out scenes with the checkpoint and print the scores."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size {args.batch_size}: must be at least 1", file=sys.stderr)
        return 2
    if args.n == 0:
        print("error: --n 0: no scene to score (a positive count, or < 0 for all)", file=sys.stderr)
        return 2
    if not (args.data / "annotations.jsonl").is_file():
        print(f"error: {args.data / 'annotations.jsonl'}: not found (write the dataset with synthetic/prepare.py scenes)",
              file=sys.stderr)
        return 2
    anns = read_annotations(args.data, "test", args.n)
    if not anns:
        print(f"error: {args.data / 'annotations.jsonl'}: holds no held-out (test_*) scene", file=sys.stderr)
        return 2
    device = sample.pick_device(args.device)
    try:
        engine = sample.load(args.checkpoint, device, sample.DTYPES[sample.default_dtype(device)])
    except (OSError, ValueError) as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    prompt = engine.prompt_ids(data.IMAGE_PLACEHOLDER + "\n" + data.task_prompt("grounding"))
    size = engine.model.cfg.image_size
    answers = []
    with torch.inference_mode():
        for start in range(0, len(anns), args.batch_size):
            chunk = anns[start:start + args.batch_size]
            try:
                pictures = [data.load_image(args.data / "images" / a["image"]) for a in chunk]
            except (OSError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            images = torch.stack([data.preprocess_image(p, size) for p in pictures])  # (B, 3, S, S)
            answers += [r.text for r in engine.generate([prompt] * len(chunk), images)]
    totals = score(answers, anns)
    if args.json:
        print(json.dumps(totals))
    else:
        print(f"{totals['scenes']} held-out scenes: ground named {totals['ground_named']}, exact {totals['exact']}; "
              f"{totals['boxes']} boxes for {totals['objects']} objects: {totals['matched']} on an object of the class "
              f"named (recall {totals['recall']:.3f}, precision {totals['precision']:.3f}), "
              f"{totals['matched_any_class']} on some object")
    return 0


if __name__ == "__main__":
    sys.exit(main())
