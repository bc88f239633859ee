"""Whole scenes (geo/tiling.py, sample.py --tile): tile layout, exact box mapping, seam merging, the CLI, legible drawings."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import sample
from boxes import Box, box_from_polygon, box_polygon, box_polygon_grid, convex_hull, format_box, pixels_to_grid, polygon_iou
from geo import tiling
from geo.labels import count_phrase, grounded_description, object_name, plural
from geo.mosaic import make_mosaic
from geochat import GeoChat, GeoChatConfig
from llama import LlamaConfig
from test_sample_cli import cli  # sample.main in this process: its exit code
from vit import ViTConfig


# ---------------------------------------------------------------------------------------------
# layout and mapping

@pytest.mark.parametrize("width,height,tile,overlap", [(1000, 600, 256, 64), (2000, 2000, 125, 31), (300, 1000, 500, 100),
                                                       (512, 512, 512, 128), (100, 90, 128, 32)])
def test_tiles_cover_the_scene_with_the_overlap_asked(width, height, tile, overlap):
    tiles = tiling.tile_grid(width, height, tile, overlap)
    covered = np.zeros((height, width), dtype=int)
    for t in tiles:
        assert t.width == min(tile, width) and t.height == min(tile, height)  # whole tiles unless the scene is smaller
        assert 0 <= t.left and t.left + t.width <= width and 0 <= t.top and t.top + t.height <= height
        covered[t.top:t.top + t.height, t.left:t.left + t.width] += 1
    assert covered.min() >= 1
    for starts, length in ((tiling.tile_starts(width, tile, overlap), width), (tiling.tile_starts(height, tile, overlap), height)):
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        assert all(tile - (b - a) >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share at least `overlap`


def test_tile_starts_refuses_bad_values():
    with pytest.raises(ValueError, match="overlap < tile"):
        tiling.tile_starts(1000, 100, 100)


@pytest.mark.parametrize("width,height,tile", [(1000, 600, 256), (300, 1000, 500), (700, 300, 256)])
def test_box_mapping_from_tile_grid_to_scene_pixels_is_exact(width, height, tile):
    """A rotated rectangle known in scene pixels, described on a tile's grid (its padded square), maps back exactly."""
    for t in tiling.tile_grid(width, height, tile, tile // 4):
        cx, cy = t.left + t.width * 0.4, t.top + t.height * 0.6
        corners = box_polygon_grid(Box(cx - 30, cy - 12, cx + 30, cy + 12, 37))  # the same numbers, read as pixels
        local = [(x - t.left, y - t.top) for x, y in corners]
        tile_box = box_from_polygon(pixels_to_grid(local, t.width, t.height), label="two ships")
        scene_box = tiling.tile_box_to_scene(tile_box, t, width, height)
        mapped = box_polygon(scene_box, width, height)
        assert polygon_iou(mapped, corners) > 0.999999
        assert math.isclose(scene_box.angle, tile_box.angle) and scene_box.label == "two ships"


# ---------------------------------------------------------------------------------------------
# merging duplicates across seams, with a fake model that sees the tile's pixels

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def fake_scene():
    """A 900 x 600 black scene with five coloured rotated objects; the 2nd and 3rd lie on seams of 256-px tiles (overlap 64)."""
    objects = [("ship", Box(40, 40, 100, 70, 20)), ("ship", Box(170, 80, 230, 110, 55)),  # x 192..256 is a seam
               ("plane", Box(400, 170, 460, 220, 0)), ("vehicle", Box(700, 450, 740, 470, 70)),
               ("ship", Box(560, 300, 640, 330, 10))]
    image = Image.new("RGB", (900, 600), "black")
    draw = ImageDraw.Draw(image)
    known = []
    for (name, box), colour in zip(objects, COLOURS):
        polygon = box_polygon_grid(box)  # the same numbers, read as pixels
        draw.polygon(polygon, fill=colour)
        known.append((name, polygon, colour))
    return image, known


def fake_answerer(known, calls):
    """answer_tiles that finds each coloured object in a tile and answers like GeoChat: <p>label</p> and the box on the tile grid."""
    def answer_tiles(tiles):
        calls.append(len(tiles))
        answers = []
        for tile in tiles:
            pixels = np.asarray(tile)
            groups = {}
            for name, _, colour in known:
                ys, xs = np.nonzero((pixels == colour).all(-1))
                if len(xs) < 4:
                    continue
                points = convex_hull([(x + 0.5, y + 0.5) for x, y in zip(xs.tolist(), ys.tolist())])  # pixel centres
                box = box_from_polygon(pixels_to_grid(points, *tile.size))
                groups.setdefault(name, []).append(format_box(box))
            answers.append(grounded_description(list(groups.items())))
        return answers
    return answer_tiles


def test_objects_on_seams_are_merged_into_one_box_each_in_scene_pixels():
    image, known = fake_scene()
    calls = []
    scene = tiling.tiled_answer(fake_answerer(known, calls), image, 256, 64, "grounding", batch_size=4, progress=False)
    assert scene.tiles == len(tiling.tile_grid(900, 600, 256, 64)) == 15 and calls == [4, 4, 4, 3]  # batches of tiles
    assert scene.raw_boxes > len(known)  # overlapping tiles saw some objects twice or cut them
    assert len(scene.boxes) == len(known)  # ... and each object comes back once
    for name, polygon, _ in known:
        best = max(scene.boxes, key=lambda b: polygon_iou(b.polygon, polygon))
        assert best.box.label == name and polygon_iou(best.polygon, polygon) > 0.8  # the fake's pixel rasterisation
    assert "<p>three ships</p>" in scene.text and "<p>a plane</p>" in scene.text and "<p>a vehicle</p>" in scene.text
    assert scene.text.startswith("The scene shows")


def test_refer_on_tiles_gives_one_answer_of_boxes():
    image, known = fake_scene()
    only_ships = [k for k in known if k[0] == "ship"]

    def answer_tiles(tiles):  # GeoChat's [refer] answers are bare boxes
        return [answer.split("</p>", 1)[1].strip(" .") if "</p>" in answer else ""
                for answer in fake_answerer(only_ships, [])(tiles)]

    scene = tiling.tiled_answer(answer_tiles, image, 256, 64, "refer", label="all ships", progress=False)
    assert len(scene.boxes) == 3 and all(b.box.label == "all ships" for b in scene.boxes)
    assert scene.text == "".join(format_box(b.box) for b in scene.boxes)


def test_merge_keeps_the_most_complete_view_and_separate_neighbours():
    tile_a, tile_b = tiling.Tile(0, 0, 256, 256), tiling.Tile(192, 0, 256, 256)
    whole = [(200, 100), (250, 100), (250, 120), (200, 120)]  # inside both tiles; 6 px from tile_a's right seam
    cut = [(200, 100), (256, 100), (256, 120), (200, 120)]  # how tile_a would see a longer object cut at its seam
    full_view = tiling.SceneBox(Box(0, 0, 1, 1, 0, "ship"), [(200, 100), (270, 100), (270, 120), (200, 120)], tile_b, 8.0)
    cut_view = tiling.SceneBox(Box(0, 0, 1, 1, 0, "ship"), cut, tile_a, 0.0)
    kept = tiling.merge_duplicates([cut_view, full_view])
    assert kept == [full_view]  # the cut one lies inside the full one: dropped, whatever the order
    same_a = tiling.SceneBox(Box(0, 0, 1, 1, 0, "ship"), whole, tile_a, 6.0)
    same_b = tiling.SceneBox(Box(0, 0, 1, 1, 0, "ship"), whole, tile_b, 8.0)
    neighbour = tiling.SceneBox(Box(0, 0, 1, 1, 0, "ship"), [(252, 100), (300, 100), (300, 120), (252, 120)], tile_b, 8.0)
    assert tiling.merge_duplicates([same_a, same_b, neighbour]) == [same_b, neighbour]


def test_seam_margin_ignores_the_scene_border():
    t = tiling.Tile(0, 0, 256, 256)
    assert tiling.seam_margin([(10, 10), (20, 20)], t, 256, 256) == math.inf  # the whole scene: no seam
    assert tiling.seam_margin([(10, 10), (240, 20)], t, 1000, 256) == 16  # right edge is a seam


def test_tiled_answer_refuses_other_tasks_and_short_answers():
    image = Image.new("RGB", (300, 300))
    with pytest.raises(ValueError, match="task must be one of"):
        tiling.tiled_answer(lambda tiles: ["x"] * len(tiles), image, 128, 32, "vqa", progress=False)
    with pytest.raises(ValueError, match="returned 0 answers for"):
        tiling.tiled_answer(lambda tiles: [], image, 128, 32, progress=False)


def test_labels_count_and_name_objects():
    assert [object_name(x) for x in ("two ships", "a storage tank", "12 small vehicles", "the harbor", "ferries")] == \
        ["ship", "storage tank", "small vehicle", "harbor", "ferry"]
    assert [count_phrase("ship", n) for n in (1, 2, 10, 12)] == ["a ship", "two ships", "ten ships", "12 ships"]
    assert count_phrase("airplane", 1) == "an airplane" and plural("bus") == "buses" and plural("ferry") == "ferries"
    assert grounded_description([("plane", ["{<1><2><3><4>|<0>}"])]) == "The image shows <p>a plane</p> {<1><2><3><4>|<0>}."


def test_load_scene_reads_past_pillows_bomb_limit_and_restores_it(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), "green").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is then a "bomb" for data.load_image
    with pytest.raises(ValueError, match="too large"):
        data.load_image(path)
    assert tiling.load_scene(path).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_mosaic_objects_are_where_they_are_drawn():
    image, objects = make_mosaic(seed=1, cells=2, cell=125)
    assert image.size == (250, 250) and objects
    for obj in objects:
        xs, ys = [p[0] for p in obj.polygon], [p[1] for p in obj.polygon]
        assert 0 <= min(xs) and max(xs) <= 250 and 0 <= min(ys) and max(ys) <= 250


# ---------------------------------------------------------------------------------------------
# drawing (issue 13): legible labels, never clipped, huge images shrunk

def test_small_images_are_upscaled_and_huge_ones_downscaled_for_display():
    small = sample.draw_boxes(Image.new("RGB", (128, 128), "white"), [])
    assert small.size == (512, 512)
    assert sample.draw_boxes(Image.new("RGB", (4000, 1000), "white"), []).size == (2048, 512)
    assert sample.draw_boxes(Image.new("RGB", (800, 600), "white"), []).size == (800, 600)


@pytest.mark.parametrize("answer", ["<p>a storage tank near the edge</p> {<80><0><100><12>|<0>}",  # right and top border
                                    "<p>a very long label for a small box</p> {<95><90><100><100>|<0>}"])  # bottom-right corner
def test_labels_touching_the_border_lie_inside_the_image(answer):
    image = Image.new("RGB", (128, 128), "white")
    drawn = sample.draw_boxes(image, sample.box_records(answer, 128, 128))
    pixels = np.asarray(drawn)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)  # the label's background (first colour)
    ys, xs = np.nonzero(red)
    assert xs.max() <= drawn.width - 1 and ys.min() >= 0
    text = (pixels.sum(-1) < 100)  # the black label text, all of it drawn inside the picture
    assert text.sum() > 50
    label_w = sample.ImageDraw.Draw(drawn).textlength("a very long label for a small box",
                                                      font=sample.ImageFont.load_default(size=16))
    assert label_w < drawn.width  # the text fits the upscaled picture


def test_label_origin_moves_labels_inside():
    assert sample.label_origin((500, 0), (80, 20), (512, 512)) == (432, 2)  # no room above: below the anchor, pulled left
    assert sample.label_origin((100, 100), (80, 20), (512, 512)) == (100, 78)  # room above: just above
    assert sample.label_origin((-5, 600), (80, 20), (512, 512)) == (0, 492)


def test_labels_never_cover_each_other():
    # three boxes with one label at one anchor (a grounded "three ships" answer): stacked below, then above, inside
    taken = []
    for _ in range(3):
        x, y = sample.place_label((100, 100), (80, 20), (512, 512), taken)
        taken.append((x, y, x + 80, y + 20))
    assert taken == [(100, 100, 180, 120), (100, 121, 180, 141), (100, 79, 180, 99)]
    assert sample.place_label((100, 492), (80, 20), (512, 512), [(100, 492, 180, 512)]) == (100, 471)  # no room below
    assert sample.place_label((300, 100), (80, 20), (512, 512), taken) == (300, 100)  # beside the others: unmoved
    full = [(0, 0, 512, 512)]
    assert sample.place_label((10, 10), (80, 20), (512, 512), full) == (10, 10)  # no free spot: where it was


# ---------------------------------------------------------------------------------------------
# the command line on a tiny random model

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, sp_model_path):
    vision = ViTConfig(image_size=28, patch_size=14, width=32, n_layers=2, n_heads=2, mlp_dim=64)
    llm = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128, max_seq_len=512)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    GeoChat(GeoChatConfig(vision=vision, llm=llm, image_size=28)).save_pretrained(folder, tokenizer_model=sp_model_path)
    return folder


def test_tiled_cli_prints_one_answer_and_writes_the_picture_and_geojson(tiny_model_dir, tmp_path, capsys):
    scene = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 230, 3), dtype=np.uint8)).save(scene)
    out, geojson = tmp_path / "boxes.png", tmp_path / "boxes.geojson"
    code = cli("--checkpoint", tiny_model_dir, "--image", scene, "--tile", 64, "--overlap", 16, "--tile-batch", 5,
               "--max-new-tokens", 3, "--device", "cpu", "--json", "--out", out, "--geojson", geojson)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["tiles"] == len(tiling.tile_grid(230, 150, 64, 16)) and isinstance(result["boxes"], list)
    assert "tiles" in captured.err  # the progress bar
    assert Image.open(out).size == (785, 512)  # upscaled for display
    collection = json.loads(geojson.read_text())
    assert collection["type"] == "FeatureCollection" and collection["coordinates"] == "pixel"
    before = geojson.read_bytes()
    assert cli("--checkpoint", tiny_model_dir, "--image", scene, "--tile", 64, "--geojson", geojson) == 2
    assert "already exists" in capsys.readouterr().err and geojson.read_bytes() == before


BAD_TILING = [
    (["--tile", "8"], "--tile must be at least 16"),
    (["--tile", "128", "--overlap", "65"], "--overlap must be in [0, 64]"),
    (["--tile", "128", "--overlap", "-1"], "--overlap must be in [0, 64]"),
    (["--tile", "128", "--tile-batch", "0"], "--tile-batch must be >= 1"),
    (["--tile", "128", "--task", "vqa"], "--tile merges boxes: it works with --task grounding or refer, not vqa"),
    (["--overlap", "10"], "--overlap only applies to tiled scenes"),
    (["--tile", "128", "--interactive"], "does not take --tile"),
    (["--geojson", "{tmp}/boxes.txt"], "needs the extension .geojson"),
    (["--geojson", "{tmp}/nowhere/boxes.geojson"], "does not exist"),
]


@pytest.mark.parametrize("argv,message", BAD_TILING, ids=[case[1] for case in BAD_TILING])
def test_bad_tiling_options_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli("--image", image, "--checkpoint", tmp_path / "not_loaded", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tiled_demo_prints_its_table_and_draws_the_picture(tiny_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tiled_demo", Path(__file__).resolve().parents[1] / "scripts" / "tiled_demo.py")
    tiled_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiled_demo)

    known = [("ship", [(0, 0), (10, 0), (10, 5), (0, 5)]), ("plane", [(20, 20), (30, 20), (30, 30), (20, 30)])]
    perfect = tiled_demo.row("x", 1, 2, list(reversed(known)), known, 0.0)
    assert (perfect["matched"], perfect["recall"], perfect["precision"], perfect["mean_iou"]) == (2, 1.0, 1.0, 1.0)
    wrong_class = tiled_demo.row("x", 1, 1, [("plane", known[0][1])], known, 0.0)
    assert wrong_class["matched"] == 0 and wrong_class["precision"] == 0.0
    out = tmp_path / "demo.png"
    tiled_demo.main(["--checkpoint", str(tiny_model_dir), "--cells", "2", "--tile", "64", "--overlaps", "0", "16",
                     "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| one view (128 px shrunk to 28) | 1 |" in printed and "| tiles of 64 px, overlap 16 | 9 |" in printed
    assert Image.open(out).size == (512, 512)
    with pytest.raises(SystemExit, match="already exists"):
        tiled_demo.main(["--checkpoint", str(tiny_model_dir), "--out", str(out)])
