"""Whole scenes: overlapping tiles, answers per tile, boxes mapped to the scene and merged.

A scene of any size is cut into N x N tiles that overlap by `overlap` pixels (the last row and column
are moved back to end at the scene's border, so every tile is whole when the scene is at least N
wide; a scene narrower than N gives narrower tiles, which the model sees padded to a square like any
image). Each tile's answer is parsed (boxes.parse_boxes); every box goes from the tile's 0-100 grid to
the scene's 0-100 grid exactly (both are padded squares, so the map is a uniform scale and a shift
and θ is unchanged) and to scene pixels by boxes.box_polygon. Overlapping tiles see an object twice,
and a tile seam cuts it: duplicates are merged by rotated-box non-maximum suppression, where the box
seen farthest from its tile's inner edges wins (the most complete view) and a box is dropped when it
overlaps a kept one by IoU >= iou_threshold, lies mostly (>= containment) inside it, or touches a seam
(a cut view, whose fitted rectangle may stick out of the whole object's) with >= cut_overlap of it inside.
"""

import math
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

import data
from boxes import Box, box_polygon, format_box, parse_boxes, polygon_area, polygon_intersection, polygon_iou
from geo.labels import grounded_description, object_name

TILED_TASKS = ("grounding", "refer")  # the tasks whose answers are boxes that a scene can merge
SEAM_TOUCH_PIXELS = 1.0  # a box this close to (or across) a seam of its tile is a view cut by the seam
MAX_SCENE_PIXELS = 1_000_000_000  # Pillow refuses images above ~179M pixels as decompression bombs; scenes may be larger


@dataclass(frozen=True)
class Tile:
    """A tile's rectangle in scene pixels: left, top, width, height."""
    left: int
    top: int
    width: int
    height: int


@dataclass
class SceneBox:
    """One box of a scene: on the scene's 0-100 grid (exact, not rounded), in scene pixels, and where it came from."""
    box: Box
    polygon: list
    tile: Tile
    margin: float  # distance from the box to the nearest inner edge of its tile (a seam), in pixels; larger: more complete


@dataclass
class SceneAnswer:
    """The merged answer of a tiled scene: one text, every object once."""
    text: str
    boxes: list = field(default_factory=list)  # SceneBox, in reading order
    tiles: int = 0
    raw_boxes: int = 0  # boxes over all tiles before merging


def tile_starts(length: int, tile: int, overlap: int) -> list:
    """Start offsets of tiles of `tile` pixels covering 0..length with at least `overlap` pixels shared; the last ends at length."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list:
    """The tiles covering a width x height scene, row by row."""
    return [Tile(left, top, min(tile, width), min(tile, height))
            for top in tile_starts(height, tile, overlap) for left in tile_starts(width, tile, overlap)]


def tile_box_to_scene(box: Box, tile: Tile, width: int, height: int) -> Box:
    """A box on a tile's 0-100 grid -> the same box on the 0-100 grid of the width x height scene (θ unchanged)."""
    tile_side, scene_side = max(tile.width, tile.height), max(width, height)
    tile_pad_x, tile_pad_y = (tile_side - tile.width) // 2, (tile_side - tile.height) // 2
    scene_pad_x, scene_pad_y = (scene_side - width) // 2, (scene_side - height) // 2
    scale = tile_side / scene_side
    shift_x = (tile.left - tile_pad_x + scene_pad_x) * 100 / scene_side
    shift_y = (tile.top - tile_pad_y + scene_pad_y) * 100 / scene_side
    return Box(box.x1 * scale + shift_x, box.y1 * scale + shift_y, box.x2 * scale + shift_x, box.y2 * scale + shift_y,
               box.angle, box.label)


def seam_margin(polygon, tile: Tile, width: int, height: int) -> float:
    """Distance in pixels from the polygon to the nearest tile edge that is a seam (not the scene's border); inf if none."""
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    gaps = []
    if tile.left > 0:
        gaps.append(min(xs) - tile.left)
    if tile.top > 0:
        gaps.append(min(ys) - tile.top)
    if tile.left + tile.width < width:
        gaps.append(tile.left + tile.width - max(xs))
    if tile.top + tile.height < height:
        gaps.append(tile.top + tile.height - max(ys))
    return min(gaps) if gaps else math.inf


def is_duplicate(candidate: SceneBox, kept: SceneBox, iou_threshold: float, containment: float, cut_overlap: float) -> bool:
    """Whether candidate is another view of kept: IoU >= iou_threshold, or mostly inside it, or cut by a seam and partly inside it."""
    if polygon_iou(candidate.polygon, kept.polygon) >= iou_threshold:
        return True
    shared = polygon_intersection(candidate.polygon, kept.polygon)
    if not shared:
        return False
    shared_area, own_area = polygon_area(shared), polygon_area(candidate.polygon)
    smaller = min(own_area, polygon_area(kept.polygon))
    if smaller > 0 and shared_area / smaller >= containment:
        return True
    # a view cut by a seam is a partial object whose fitted rectangle may stick out of the whole one
    return candidate.margin <= SEAM_TOUCH_PIXELS and own_area > 0 and shared_area / own_area >= cut_overlap


def merge_duplicates(boxes: list, iou_threshold: float = 0.5, containment: float = 0.7, cut_overlap: float = 0.3) -> list:
    """Rotated-box NMS over SceneBoxes: most complete view first (largest margin), later views that duplicate a kept box dropped."""
    order = sorted(boxes, key=lambda b: (-b.margin, -polygon_area(b.polygon)))
    kept = []
    for candidate in order:
        if not any(is_duplicate(candidate, other, iou_threshold, containment, cut_overlap) for other in kept):
            kept.append(candidate)
    return sorted(kept, key=lambda b: ((b.box.y1 + b.box.y2) / 2, (b.box.x1 + b.box.x2) / 2))


def scene_boxes(answer: str, tile: Tile, width: int, height: int, label=None) -> list:
    """A tile's answer -> its boxes as SceneBoxes of the width x height scene; labels become object names, label= names unlabelled boxes."""
    out = []
    for box in parse_boxes(answer):
        box.label = label if box.label is None else object_name(box.label)  # "two ships" counts this tile only: "ship"
        scene_box = tile_box_to_scene(box, tile, width, height)
        polygon = box_polygon(scene_box, width, height)
        out.append(SceneBox(scene_box, polygon, tile, seam_margin(polygon, tile, width, height)))
    return out


def scene_text(boxes: list, task: str) -> str:
    """The scene's one answer: a grounded description (boxes grouped by object) or, for refer, the boxes in a row."""
    if task == "refer":
        return "".join(format_box(b.box) for b in boxes)
    groups = {}
    for b in boxes:
        groups.setdefault(object_name(b.box.label or "object"), []).append(format_box(b.box))
    return grounded_description(list(groups.items()), subject="scene")


def tiled_answer(answer_tiles, image: Image.Image, tile: int, overlap: int, task: str = "grounding", batch_size: int = 8,
                 label=None, iou_threshold: float = 0.5, containment: float = 0.7, progress: bool = True) -> SceneAnswer:
    """Answer a whole scene: answer_tiles(list of PIL tiles) -> list of answer strings is called per batch of tiles."""
    if task not in TILED_TASKS:
        raise ValueError(f"tiling merges boxes: task must be one of {TILED_TASKS}, got {task!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    width, height = image.size
    tiles = tile_grid(width, height, tile, overlap)
    found = []
    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not progress) as bar:
        for start in range(0, len(tiles), batch_size):
            batch = tiles[start:start + batch_size]
            crops = [image.crop((t.left, t.top, t.left + t.width, t.top + t.height)) for t in batch]
            answers = answer_tiles(crops)
            if len(answers) != len(batch):
                raise ValueError(f"answer_tiles returned {len(answers)} answers for {len(batch)} tiles")
            for t, answer in zip(batch, answers):
                found.extend(scene_boxes(answer, t, width, height, label))
            bar.update(len(batch))
    merged = merge_duplicates(found, iou_threshold, containment)
    return SceneAnswer(scene_text(merged, task), merged, len(tiles), len(found))


def engine_answerer(engine, user_text: str, max_new_tokens: int = 256, temperature: float = 0.0, top_k=None, top_p=None,
                    seed=None):
    """answer_tiles for tiled_answer from a sample.Engine: one left-padded batch per call, the same question for every tile."""
    import torch

    prompt = engine.prompt_ids(user_text)
    size = engine.model.cfg.image_size

    def answer_tiles(tiles):
        images = torch.stack([data.preprocess_image(t, size) for t in tiles])
        results = engine.generate([prompt] * len(tiles), images, max_new_tokens, temperature, top_k, top_p, seed)
        return [r.text for r in results]

    return answer_tiles


def load_scene(path):
    """A scene image of up to MAX_SCENE_PIXELS as RGB (data.load_image, with Pillow's decompression-bomb limit raised for this call)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_SCENE_PIXELS // 2  # Pillow raises above twice this value
    try:
        return data.load_image(path)
    except ValueError as error:
        from geo.georef import read_with_rasterio

        return read_with_rasterio(path, error)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
