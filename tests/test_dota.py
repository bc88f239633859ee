"""Your own labelled data (geo/dota.py): polygon -> GeoChat box -> polygon, DOTA files, tiles, and convert -> LoRA -> eval."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import eval as geochat_eval
import train
from boxes import (Box, box_from_polygon, box_polygon, box_polygon_grid, format_box, parse_boxes, pixels_to_grid,
                   polygon_intersection, polygon_iou)
from geo import dota
from geochat import GeoChat, GeoChatConfig
from llama import LlamaConfig
from vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]
shapely_geometry = pytest.importorskip("shapely.geometry")


def rectangle(cx, cy, w, h, degrees):
    """Corners of a w x h rectangle turned by `degrees` on screen (any direction), in pixels."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(cx + dx * c - dy * s, cy + dx * s + dy * c) for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]


# ---------------------------------------------------------------------------------------------
# geometry

@pytest.mark.parametrize("width,height", [(800, 600), (600, 800), (500, 500)])
def test_polygon_box_polygon_round_trip_at_every_angle(width, height):
    worst = 1.0
    for degrees in range(360):
        for w, h in ((120, 40), (40, 120), (60, 60), (200, 15)):
            corners = rectangle(width * 0.45, height * 0.55, w, h, degrees)
            box = box_from_polygon(pixels_to_grid(corners[degrees % 4:] + corners[:degrees % 4], width, height))  # any start corner
            assert 0 <= box.angle < 90 and box.x1 <= box.x2 and box.y1 <= box.y2
            worst = min(worst, polygon_iou(box_polygon(box, width, height), corners))
    assert worst >= 0.99


def test_fitted_box_agrees_with_shapely_and_the_rotation_convention():
    assert box_from_polygon([(10, 10), (40, 10), (40, 20), (10, 20)]) == Box(10, 10, 40, 20, 0)
    box = Box(30, 40, 70, 50, 30)  # counter-clockwise on screen: the right end goes up (smaller y)
    fitted = box_from_polygon(box_polygon_grid(box))
    assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip((fitted.x1, fitted.y1, fitted.x2, fitted.y2, fitted.angle), (30, 40, 70, 50, 30)))
    corners = box_polygon_grid(box)
    assert corners[1][1] < corners[0][1]  # (x2, y1) is above (x1, y1) after the turn
    blob = [(0, 0), (10, 2), (14, 9), (6, 14), (-2, 8)]
    rect = shapely_geometry.Polygon(blob).minimum_rotated_rectangle
    fitted = shapely_geometry.Polygon(box_polygon_grid(box_from_polygon(blob)))
    assert fitted.area == pytest.approx(rect.area, rel=1e-9) and fitted.contains(shapely_geometry.Polygon(blob).buffer(-1e-9))


def test_formatted_boxes_of_large_objects_keep_their_shape():
    for degrees in range(0, 360, 7):
        corners = rectangle(400, 300, 300, 120, degrees)
        box = parse_boxes(format_box(box_from_polygon(pixels_to_grid(corners, 800, 600))))[0]  # integers on the grid
        assert polygon_iou(box_polygon(box, 800, 600), corners) >= 0.9


def test_polygon_intersection_and_pixels_to_grid_against_shapely():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = box_polygon_grid(Box(*sorted(rng.uniform(0, 60, 2)), *sorted(rng.uniform(40, 100, 2)), rng.uniform(0, 90)))
        b = box_polygon_grid(Box(*sorted(rng.uniform(0, 60, 2)), *sorted(rng.uniform(40, 100, 2)), rng.uniform(0, 90)))
        shared = polygon_intersection(a, b)
        expected = shapely_geometry.Polygon(a).intersection(shapely_geometry.Polygon(b)).area
        assert (shapely_geometry.Polygon(shared).area if shared else 0.0) == pytest.approx(expected, abs=1e-9)
    assert polygon_intersection([(0, 0), (1, 0), (1, 1), (0, 1)], [(2, 2), (3, 2), (3, 3), (2, 3)]) == []
    box = Box(10, 20, 40, 35, 25)
    for width, height in ((300, 200), (200, 300)):
        grid = pixels_to_grid(box_polygon(box, width, height), width, height)
        assert all(math.isclose(g, e, abs_tol=1e-9) for p, q in zip(grid, box_polygon_grid(box)) for g, e in zip(p, q))


def test_degenerate_polygon_is_refused():
    with pytest.raises(ValueError, match="encloses no area"):
        box_from_polygon([(0, 0), (1, 1), (2, 2), (3, 3)])


# ---------------------------------------------------------------------------------------------
# label files

def test_label_file_headers_difficult_and_degenerate(tmp_path):
    path = tmp_path / "P0001.txt"
    path.write_text("imagesource:GoogleEarth\ngsd:0.146\n\n"
                    "10 10 50 10 50 30 10 30 small-vehicle 0\n"
                    "100 100 140 100 140 160 100 160 plane 1\n"
                    "5 5 5 5 5 5 5 5 ship 0\n"
                    "1 1 9 1 9 9 1 9 Storage_Tank\n")
    objects, degenerate = dota.parse_label_file(path)
    assert [(o.name, o.difficult) for o in objects] == [("small vehicle", False), ("plane", True), ("storage tank", False)]
    assert degenerate == 1 and objects[0].polygon[2] == (50.0, 30.0)


@pytest.mark.parametrize("line,message", [("1 2 3 4 plane 0", "expected 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult'"),
                                          ("1 2 3 4 5 6 7 x plane 0", "must be numbers"),
                                          ("1 2 3 4 5 6 7 8 plane 2", "difficult flag must be 0 or 1"),
                                          ("1 2 3 4 5 6 7 inf plane 0", "must be finite"),
                                          ("1 2 3 4 5 6 7 8 123 0", "the class must be a name")])
def test_bad_label_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "P0002.txt"
    path.write_text("10 10 50 10 50 30 10 30 ship 0\n" + line + "\n")
    with pytest.raises(dota.ConversionError, match=message) as error:
        dota.parse_label_file(path)
    assert f"{path}:2:" in str(error.value)


# ---------------------------------------------------------------------------------------------
# converting a folder

CLASSES = ("plane", "ship", "storage-tank")


def write_dota_folder(root: Path, n_images=6, size=(360, 240)) -> tuple:
    """n_images images with three rotated objects each (one straddling x = 200) and their DOTA label files."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for k in range(n_images):
        image = Image.new("RGB", size, (60, 100, 60))
        draw = ImageDraw.Draw(image)
        lines = ["imagesource:GoogleEarth", "gsd:0.5"]
        for j, (cx, cy, w, h, degrees) in enumerate([(60 + 5 * k, 60, 70, 30, 15 * k), (200, 150, 50, 26, 40),
                                                     (300, 190, 36, 36, 0)]):
            corners = rectangle(cx, cy, w, h, degrees)
            draw.polygon(corners, fill=(230, 230, 230))
            lines.append(" ".join(f"{v:.2f}" for point in corners for v in point) + f" {CLASSES[j]} {int(j == 2)}")
        image.save(images / f"P{k:04d}.png")
        (labels / f"P{k:04d}.txt").write_text("\n".join(lines) + "\n")
    return images, labels


def test_convert_whole_images(tmp_path):
    images, labels = write_dota_folder(tmp_path, n_images=5)
    counts = dota.convert(images, labels, tmp_path / "out", val_fraction=0.2, seed=3, log=lambda *a: None)
    assert counts["images"] == 5 and counts["held_out_images"] == 1 and counts["views"] == 5
    records = json.loads((tmp_path / "out" / "train.json").read_text())
    bench = [json.loads(line) for line in (tmp_path / "out" / "referring.jsonl").read_text().splitlines()]
    assert {r["image"] for r in records} | {b["image"] for b in bench} == {p.name for p in images.iterdir()}
    assert not {r["image"] for r in records} & {b["image"] for b in bench}  # held-out images are never trained on
    assert {p.name for p in (tmp_path / "out" / "images").iterdir()} == {p.name for p in images.iterdir()}
    questions = [r["conversations"][0]["value"] for r in records]
    assert all(q.startswith("<image>\n") for q in questions)
    grounding = [r for r in records if r["conversations"][0]["value"] == "<image>\n[grounding] Describe the image in detail."]
    assert len(grounding) == 4
    answer = grounding[0]["conversations"][1]["value"]
    assert "<p>a plane</p>" in answer and "<p>a ship</p>" in answer and "<p>a storage tank</p>" in answer
    # every box in every answer is the object's rotated rectangle on the padded square's grid
    record = next(r for r in records if r["image"] == grounding[0]["image"])
    objects, _ = dota.parse_label_file(labels / (Path(record["image"]).stem + ".txt"))
    for box, obj in zip(parse_boxes(answer), sorted(objects, key=lambda o: sum(p[1] for p in o.polygon))):
        assert polygon_iou(box_polygon(box, 360, 240), obj.polygon) > 0.85  # integers on a 0-100 grid of 360 px
    assert any(q.startswith("<image>\n[refer] Give me the location of <p> the ship </p>") for q in questions)
    identify = [r for r in records if "[identify]" in r["conversations"][0]["value"]]
    assert identify and all(r["conversations"][1]["value"] in ("A plane.", "A ship.", "A storage tank.") for r in identify)
    assert len(bench) == 3 and {b["type"] for b in bench} == {"ref"} and all(b["dataset"] == "dota" for b in bench)
    assert all(parse_boxes(b["ground_truth"]) for b in bench)


def test_convert_tiles_clips_objects_at_tile_edges(tmp_path):
    images, labels = write_dota_folder(tmp_path, n_images=2)
    counts = dota.convert(images, labels, tmp_path / "out", tile=200, overlap=40, val_fraction=0, min_visible=0.3,
                          log=lambda *a: None)
    assert counts["views"] == 2 * 2 * 2  # 360 x 240 in 200-px tiles: 2 columns, 2 rows
    tiles = sorted((tmp_path / "out" / "images").iterdir())
    assert all(Image.open(t).size == (200, 200) for t in tiles)
    records = json.loads((tmp_path / "out" / "train.json").read_text())
    ship = [r for r in records if r["image"] == "P0000_0_0.png" and "the ship" in r["conversations"][0]["value"]]
    # the ship (x about 172..228) is cut by the tile at x 0..200: its box is the rectangle fitted to the visible part
    box = parse_boxes(ship[0]["conversations"][1]["value"])[0]
    objects, _ = dota.parse_label_file(labels / "P0000.txt")
    whole = shapely_geometry.Polygon(objects[1].polygon)
    visible = whole.intersection(shapely_geometry.box(0, 0, 200, 200))
    fitted = shapely_geometry.Polygon(box_polygon(box, 200, 200))
    assert 0.3 < visible.area / whole.area < 0.95  # really cut
    assert fitted.intersection(visible).area / visible.area > 0.9 and fitted.area < 0.95 * whole.area


def test_convert_refuses_to_overwrite_and_bad_options(tmp_path):
    images, labels = write_dota_folder(tmp_path, n_images=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(dota.ConversionError, match="not an empty directory"):
        dota.convert(images, labels, out)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(dota.ConversionError, match="--overlap must be in"):
        dota.convert(images, labels, tmp_path / "new", tile=100, overlap=60)
    (labels / "P0009.txt").write_text("1 1 9 1 9 9 1 9 ship 0\n")
    with pytest.raises(dota.ConversionError, match="no image named P0009"):
        dota.convert(images, labels, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # checked before anything is written


def test_converter_cli_bad_line_is_one_line_exit_2(tmp_path):
    images, labels = write_dota_folder(tmp_path, n_images=1)
    (labels / "P0000.txt").write_text("1 2 3 4 plane\n")
    r = subprocess.run([sys.executable, str(ROOT / "geo" / "dota.py"), "--images", str(images), "--labels", str(labels),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "P0000.txt:1:" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# end to end: convert -> 20 LoRA steps with train.py -> eval.py run on the held-out referring file

def test_convert_train_lora_and_evaluate(tmp_path, sp_model_path):
    images, labels = write_dota_folder(tmp_path / "dota", n_images=6)
    data_dir = tmp_path / "converted"
    dota.convert(images, labels, data_dir, tile=200, overlap=40, val_fraction=0.2, log=lambda *a: None)
    vision = ViTConfig(image_size=28, patch_size=14, width=32, n_layers=2, n_heads=2, mlp_dim=64)
    llm = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128, max_seq_len=512)
    torch.manual_seed(0)
    GeoChat(GeoChatConfig(vision=vision, llm=llm, image_size=28)).save_pretrained(tmp_path / "ckpt", tokenizer_model=sp_model_path)
    summary = train.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data_dir / "train.json"),
                          "--image-folder", str(data_dir / "images"), "--out", str(tmp_path / "lora"), "--mode", "lora",
                          "--max-steps", "20", "--global-batch", "2", "--batch-size", "2", "--lr", "1e-3", "--lora-r", "8",
                          "--save-every", "0", "--device", "cpu", "--dtype", "float32", "--num-workers", "0"])
    metrics = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert summary is not None and metrics[-1]["step"] == 20 and all(math.isfinite(m["loss"]) for m in metrics)
    answers = tmp_path / "answers.jsonl"
    code = geochat_eval.main(["run", "--bench", "referring", "--questions", str(data_dir / "referring.jsonl"),
                              "--image-folder", str(data_dir / "images"), "--checkpoint", str(tmp_path / "ckpt"),
                              "--lora", str(tmp_path / "lora"), "--answers", str(answers), "--device", "cpu",
                              "--max-new-tokens", "8", "--batch-size", "4"])
    assert code == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    questions = (data_dir / "referring.jsonl").read_text().splitlines()
    assert len(rows) == len(questions) > 0 and all(isinstance(r["answer"], str) for r in rows)
    scored = geochat_eval.score_file("referring", str(answers))
    assert scored["n"] == len(questions) and 0 <= scored["acc@0.5"] <= 1
