"""DOTA-style annotations -> GeoChat_Instruct training json and a GeoChat-Bench referring file.

    python geo/dota.py --images DIR --labels DIR --out DIR [--tile 504] [--overlap 128] [--val-fraction 0.1]
    python train.py --mode lora --checkpoint CKPT --data DIR/train.json --image-folder DIR/images --out runs/mine
    python eval.py run --bench referring --questions DIR/referring.jsonl --image-folder DIR/images --checkpoint CKPT --lora runs/mine --answers answers.jsonl

A label file per image (same stem, `.txt`) holds one object per line, `x1 y1 x2 y2 x3 y3 x4 y4 class difficult`
(pixel corners; DOTA's `imagesource:` and `gsd:` header lines are skipped; DIOR-R and FAIR1M converted to
this layout work too). Each polygon becomes the smallest rotated rectangle holding it (boxes.box_from_polygon,
the project's one rotation convention) on the 0-100 grid of the padded square image or tile. With --tile,
large images are cut into overlapping tiles (geo.tiling.tile_grid); an object cut by a tile's edge is
clipped to the tile and kept when at least --min-visible of its area is inside (its box is the rectangle
fitted to the visible part, which can reach a few pixels past the edge when the object is turned).

Per training image or tile: a grounded description (`[grounding] Describe the image in detail.`), a
`[refer]` question per class ("the plane" / "all planes") and `[identify]` questions for up to
IDENTIFY_PER_IMAGE objects. Answers listing more than --max-boxes boxes are left out (they would not fit
the context). A held-out share of the images (--val-fraction, chosen by --seed, whole images so no tile
of a held-out image is trained on) goes to referring.jsonl in GeoChat-Bench's referring format instead,
which `eval.py run --bench referring` answers and scores.
"""

import argparse
import json
import math
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from boxes import box_from_polygon, format_box, pixels_to_grid, polygon_area, polygon_intersection  # noqa: E402
from data import IMAGE_PLACEHOLDER, task_prompt  # noqa: E402
from geo.labels import grounded_description, plural, region_caption  # noqa: E402
from geo.tiling import Tile, load_scene, tile_grid  # noqa: E402
from synthetic.scenes import SIZE_MEDIUM_MAX, SIZE_SMALL_MAX  # noqa: E402  (GeoChat-Bench's size groups, grid area)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
HEADER_PREFIXES = ("imagesource:", "gsd:")
IDENTIFY_PER_IMAGE = 5  # [identify] questions per image or tile
GROUNDING_QUESTION = task_prompt("grounding")


class ConversionError(ValueError):
    """A bad input file or option: reported as one line naming it, exit code 2."""


@dataclass
class DotaObject:
    """One annotated object: its 4 corners in image pixels, class name (words, no dashes) and difficult flag."""
    polygon: list
    name: str
    difficult: bool


def class_name(raw: str) -> str:
    """DOTA's class token -> words: "small-vehicle" -> "small vehicle"."""
    return " ".join(raw.replace("-", " ").replace("_", " ").split()).lower()


def parse_label_file(path) -> tuple:
    """(objects, number of zero-area polygons skipped) of a DOTA label file; ConversionError naming file:line on a bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConversionError(f"{path}: not a text file") from None
    objects, degenerate = [], 0
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or line.strip().lower().startswith(HEADER_PREFIXES):
            continue
        where = f"{path}:{number}"
        if len(words) not in (9, 10):
            raise ConversionError(f"{where}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult', got {line.strip()!r}")
        try:
            values = [float(w) for w in words[:8]]
        except ValueError:
            raise ConversionError(f"{where}: the first eight fields must be numbers, got {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise ConversionError(f"{where}: corner coordinates must be finite, got {line.strip()!r}")
        difficult = words[9] if len(words) == 10 else "0"
        if difficult not in ("0", "1"):
            raise ConversionError(f"{where}: the difficult flag must be 0 or 1, got {difficult!r}")
        name = class_name(words[8])
        if not name or not any(c.isalpha() for c in name):
            raise ConversionError(f"{where}: the class must be a name, got {words[8]!r}")
        polygon = [(values[i], values[i + 1]) for i in range(0, 8, 2)]
        if polygon_area(polygon) <= 0:
            degenerate += 1
            continue
        objects.append(DotaObject(polygon, name, difficult == "1"))
    return objects, degenerate


def find_image(images: Path, stem: str) -> Path:
    """The image file named stem with an image suffix in images (ConversionError when there is none)."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (images / (stem + suffix), images / (stem + suffix.upper())):
            if candidate.is_file():
                return candidate
    raise ConversionError(f"{images}: no image named {stem} with suffix {', '.join(IMAGE_SUFFIXES)} for its label file")


def image_size(path: Path) -> tuple:
    """(width, height) from the image header (ConversionError for an unreadable file)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError) as e:
        raise ConversionError(f"{path}: not a readable image ({e})") from None


def tile_objects(objects: list, tile: Tile, min_visible: float) -> list:
    """The objects seen in a tile as GeoChat Boxes on the tile's grid (clipped to it), labelled with their class, reading order."""
    rect = [(tile.left, tile.top), (tile.left + tile.width, tile.top), (tile.left + tile.width, tile.top + tile.height),
            (tile.left, tile.top + tile.height)]
    boxes = []
    for obj in objects:
        visible = polygon_intersection(obj.polygon, rect)
        if not visible or polygon_area(visible) < min_visible * polygon_area(obj.polygon):
            continue
        local = [(x - tile.left, y - tile.top) for x, y in visible]
        boxes.append(box_from_polygon(pixels_to_grid(local, tile.width, tile.height), label=obj.name))
    return sorted(boxes, key=lambda b: (b.y1 + b.y2, b.x1 + b.x2))


def by_class(boxes: list) -> dict:
    """{class name: [boxes]} in the order classes first appear."""
    groups = {}
    for b in boxes:
        groups.setdefault(b.label, []).append(b)
    return groups


def refer_expression(name: str, count: int) -> str:
    """ "the plane" for one object, "all planes" for more (the synthetic world's and GeoChat-Bench's wording)."""
    return f"the {name}" if count == 1 else f"all {plural(name)}"


def size_group(boxes: list) -> str:
    """GeoChat-Bench's size group of a target by its mean box area on the 0-100 grid."""
    area = sum((b.x2 - b.x1) * (b.y2 - b.y1) for b in boxes) / len(boxes)
    return "small" if area < SIZE_SMALL_MAX else "medium" if area < SIZE_MEDIUM_MAX else "large"


def record(record_id: str, image: str, question: str, answer: str) -> dict:
    """One single-turn GeoChat_Instruct record."""
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": IMAGE_PLACEHOLDER + "\n" + question}, {"from": "gpt", "value": answer}]}


def training_records(name: str, boxes: list, max_boxes: int, rng: random.Random) -> tuple:
    """(records, answers left out for holding more than max_boxes boxes) of one training image or tile."""
    stem = Path(name).stem
    records, left_out = [], 0
    groups = by_class(boxes)
    if len(boxes) <= max_boxes:
        description = grounded_description([(cls, [format_box(b) for b in group]) for cls, group in groups.items()])
        records.append(record(f"{stem}_grounding", name, GROUNDING_QUESTION, description))
    else:
        left_out += 1
    for cls, group in groups.items():
        if len(group) > max_boxes:
            left_out += 1
            continue
        question = task_prompt("refer", expression=refer_expression(cls, len(group)))
        records.append(record(f"{stem}_refer_{cls.replace(' ', '_')}", name, question, "".join(format_box(b) for b in group)))
    for k, b in enumerate(rng.sample(boxes, min(IDENTIFY_PER_IMAGE, len(boxes)))):
        records.append(record(f"{stem}_identify_{k}", name, task_prompt("identify", box=b), region_caption(b.label)))
    return records, left_out


def bench_rows(name: str, boxes: list, max_boxes: int, first_id: int) -> list:
    """GeoChat-Bench referring rows (one per class) of a held-out image or tile, question ids from first_id."""
    rows = []
    stem = Path(name).stem
    for cls, group in by_class(boxes).items():
        if len(group) > max_boxes:
            continue
        rows.append({"question_id": first_id + len(rows), "image_id": stem, "image": name,
                     "question": refer_expression(cls, len(group)), "ground_truth": "".join(format_box(b) for b in group),
                     "type": "ref" if len(group) == 1 else "grounding", "obj_ids": [i for i, b in enumerate(boxes) if b.label == cls],
                     "size_group": size_group(group), "dataset": "dota"})
    return rows


def split_stems(stems: list, val_fraction: float, seed: int) -> set:
    """The held-out stems: a seeded random val_fraction of them (at least one when the fraction is above 0 and two or more exist)."""
    if val_fraction <= 0 or len(stems) < 2:
        return set()
    shuffled = sorted(stems)
    random.Random(seed).shuffle(shuffled)
    count = min(len(stems) - 1, max(1, round(len(stems) * val_fraction)))
    return set(shuffled[:count])


def convert(images: Path, labels: Path, out: Path, tile=None, overlap=None, val_fraction=0.1, seed=0, min_visible=0.5,
            max_boxes=20, skip_difficult=False, log=print) -> dict:
    """Convert a DOTA-style folder pair into out/ (images/, train.json, referring.jsonl); returns the counts."""
    images, labels, out = Path(images), Path(labels), Path(out)
    for flag, folder in (("--images", images), ("--labels", labels)):
        if not folder.is_dir():
            raise ConversionError(f"{flag} {folder}: no such directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out}: exists and is not an empty directory (nothing is overwritten)")
    if tile is not None and tile < 16:
        raise ConversionError(f"--tile must be at least 16 pixels, got {tile}")
    overlap = (tile // 4 if overlap is None else overlap) if tile is not None else 0
    if tile is not None and not 0 <= overlap <= tile // 2:
        raise ConversionError(f"--overlap must be in [0, {tile // 2}] pixels (at most half of --tile), got {overlap}")
    if not 0 <= val_fraction < 1:
        raise ConversionError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0 < min_visible <= 1:
        raise ConversionError(f"--min-visible must be in (0, 1], got {min_visible}")
    if max_boxes < 1:
        raise ConversionError(f"--max-boxes must be >= 1, got {max_boxes}")
    label_files = sorted(labels.glob("*.txt"))
    if not label_files:
        raise ConversionError(f"--labels {labels}: no .txt label files")
    # read and check everything before writing anything
    items, degenerate = [], 0
    for path in label_files:
        objects, skipped = parse_label_file(path)
        degenerate += skipped
        objects = [o for o in objects if not (skip_difficult and o.difficult)]
        image = find_image(images, path.stem)
        items.append((path.stem, image, image_size(image), objects))
    held_out = split_stems([stem for stem, *_ in items], val_fraction, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, bench, counts = [], [], {"images": len(items), "held_out_images": len(held_out), "objects": 0, "views": 0,
                                    "left_out_answers": 0, "zero_area_polygons": degenerate}
    for stem, image_path, (width, height), objects in items:
        counts["objects"] += len(objects)
        if tile is None:
            views = [(image_path.name, Tile(0, 0, width, height))]
            shutil.copyfile(image_path, out / "images" / image_path.name)
            scene = None
        else:
            scene = load_scene(image_path)
            views = [(f"{stem}_{t.left}_{t.top}.png", t) for t in tile_grid(width, height, tile, overlap)]
        for name, view in views:
            if scene is not None:
                scene.crop((view.left, view.top, view.left + view.width, view.top + view.height)).save(out / "images" / name)
            boxes = tile_objects(objects, view, min_visible)
            counts["views"] += 1
            if stem in held_out:
                bench.extend(bench_rows(name, boxes, max_boxes, len(bench)))
            else:
                records, left_out = training_records(name, boxes, max_boxes, rng)
                train.extend(records)
                counts["left_out_answers"] += left_out
    (out / "train.json").write_text(json.dumps(train, indent=1) + "\n", encoding="utf-8")
    (out / "referring.jsonl").write_text("".join(json.dumps(row) + "\n" for row in bench), encoding="utf-8")
    counts.update(train_records=len(train), bench_questions=len(bench))
    log(f"{counts['images']} images ({counts['held_out_images']} held out), {counts['views']} images or tiles written to "
        f"{out / 'images'}, {counts['objects']} objects -> {len(train)} training records in {out / 'train.json'}, "
        f"{len(bench)} referring questions in {out / 'referring.jsonl'}")
    if counts["left_out_answers"] or degenerate:
        log(f"left out: {counts['left_out_answers']} answers with more than {max_boxes} boxes (--max-boxes), "
            f"{degenerate} zero-area polygons")
    return counts


def parse_args(argv=None):
    """The converter's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="folder of the images")
    p.add_argument("--labels", type=Path, required=True, help="folder of DOTA label files (one .txt per image, same stem)")
    p.add_argument("--out", type=Path, required=True, help="new (or empty) output folder: images/, train.json, referring.jsonl")
    p.add_argument("--tile", type=int, help="cut images into overlapping tiles of N pixels; None: whole images")
    p.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles, at most N/2; None: a quarter of --tile")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of images held out for referring.jsonl")
    p.add_argument("--seed", type=int, default=0, help="chooses the held-out images and the [identify] objects")
    p.add_argument("--min-visible", type=float, default=0.5, help="keep an object cut by a tile edge when this share of it is inside")
    p.add_argument("--max-boxes", type=int, default=20, help="leave out answers listing more boxes than this")
    p.add_argument("--skip-difficult", action="store_true", help="drop objects flagged difficult")
    return p.parse_args(argv)


def main(argv=None):
    """CLI entry point: bad input is one line on stderr and exit code 2."""
    args = parse_args(argv)
    try:
        convert(args.images, args.labels, args.out, args.tile, args.overlap, args.val_fraction, args.seed, args.min_visible,
                args.max_boxes, args.skip_difficult)
    except (ConversionError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
