"""Tests for boxes.py: GeoChat's box strings, the rotation convention, polygon IoU (checked against shapely)."""

import math
import random

import pytest

from boxes import Box, box_polygon, box_polygon_grid, format_box, parse_boxes, polygon_iou


def test_parse_boxes_labels_and_groups():
    boxes = parse_boxes("The image shows <p>two planes</p> {<8><82><16><90>|<69>}{<6><44><14><48>|<32>} and "
                        "<p> a runway </p> {<1><2><3><4>}, next to {<5><6><7><8>|<9>}.")
    assert boxes == [Box(8, 82, 16, 90, 69, "two planes"), Box(6, 44, 14, 48, 32, "two planes"),
                     Box(1, 2, 3, 4, 0, "a runway"), Box(5, 6, 7, 8, 9, None)]
    assert parse_boxes("{<16><55><24><63>|<11>}") == [Box(16, 55, 24, 63, 11, None)]
    assert parse_boxes("<p>car</p> is parked at {<1><2><3><4>}")[0].label is None
    assert parse_boxes("{<1><2><3><4>} then <p>late</p>")[0].label is None
    assert parse_boxes("no boxes here") == []
    assert parse_boxes("<p>car {<1><2><3><4>} unclosed label</p> {<5><6><7><8>}") == \
        [Box(1, 2, 3, 4, 0, None), Box(5, 6, 7, 8, 0, None)]
    assert parse_boxes("<p>a\nb</p>{<1><2><3><4>}")[0].label == "a\nb"


def test_parse_boxes_keeps_every_number_and_skips_malformed():
    box = parse_boxes("{<10><20><30><40>}")[0]  # the reference demo dropped the last number here
    assert (box.x1, box.y1, box.x2, box.y2, box.angle) == (10, 20, 30, 40, 0)
    text = ("<p>ships</p> {<1><2><3>} {<a><2><3><4>|<5>} {<1><2><3><4><5>} {<1><2><3><4>|<>} "
            "{<11><12><13><14>|<15>} {<1><2><3><4>|<5>")
    assert parse_boxes(text) == [Box(11, 12, 13, 14, 15, "ships")]
    assert parse_boxes("{< 1 ><2> <3><4.5>|<-7>}") == [Box(1, 2, 3, 4.5, -7)]
    for junk in ["{", "}", "{<", "<p>", "</p>{<1>", "{<1><2><3><4>|", "{}" * 50, "<p>" * 20 + "{<1><2><3><4>}"]:
        parse_boxes(junk)  # never raises


def test_format_box_round_trip():
    box = Box(12, 34, 56, 78, 45)
    assert format_box(box) == "{<12><34><56><78>|<45>}"
    assert parse_boxes(format_box(box)) == [box]
    assert format_box(Box(1.5, 2.4, 3.6, 99.5)) == "{<2><2><4><100>|<0>}"


def test_box_polygon_rotation_convention():
    wide = Box(10, 40, 50, 60)  # 40 wide, 20 high, centre (30, 50)
    assert box_polygon_grid(wide) == [(10, 40), (50, 40), (50, 60), (10, 60)]
    turned = box_polygon_grid(Box(10, 40, 50, 60, angle=90))
    xs, ys = [x for x, _ in turned], [y for _, y in turned]
    assert max(xs) - min(xs) == pytest.approx(20) and max(ys) - min(ys) == pytest.approx(40)  # now tall
    assert sum(xs) / 4 == pytest.approx(30) and sum(ys) / 4 == pytest.approx(50)
    # counter-clockwise on screen (y down): the top-right corner (50, 40) goes to the top-left, (20, 30)
    assert list(turned[1]) == pytest.approx([20, 30])
    # theta = 30 by hand: centre (50, 50), corner (60, 45) is (dx, dy) = (10, -5)
    corner = box_polygon_grid(Box(40, 45, 60, 55, angle=30))[1]
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert list(corner) == pytest.approx([50 + 10 * c - 5 * s, 50 - 10 * s - 5 * c])
    assert list(corner) == pytest.approx([56.160254, 40.669873])  # up and right: the right side lifted


def test_box_polygon_pixels():
    # 200 x 100 image: padded square of side 200, image rows 50..150 of the square
    def flat(points):
        return [v for point in points for v in point]
    assert flat(box_polygon(Box(0, 25, 100, 75), 200, 100)) == pytest.approx([0, 0, 200, 0, 200, 100, 0, 100])
    assert flat(box_polygon(Box(25, 0, 75, 100), 100, 200)) == pytest.approx([0, 0, 100, 0, 100, 200, 0, 200])
    assert flat(box_polygon(Box(0, 0, 10, 10), 100, 50)) == pytest.approx([0, -25, 10, -25, 10, -15, 0, -15])
    pixels = box_polygon(Box(10, 40, 50, 60, 30), 300, 300)
    assert flat(pixels) == pytest.approx([3 * v for v in flat(box_polygon_grid(Box(10, 40, 50, 60, 30)))])
    with pytest.raises(ValueError):
        box_polygon(Box(0, 0, 1, 1), 0, 10)


def rect(x1, y1, x2, y2):
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def rotated(cx, cy, w, h, deg):
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    pts = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        pts.append((cx + dx * c - dy * s, cy + dx * s + dy * c))
    return pts




def test_polygon_iou_matches_shapely_on_random_rotated_boxes():
    shapely_geometry = pytest.importorskip("shapely.geometry")
    Polygon = shapely_geometry.Polygon
    rng = random.Random(1234)
    for i in range(200):
        a = rotated(rng.uniform(20, 80), rng.uniform(20, 80), rng.uniform(1, 40),
                    rng.uniform(1, 40), rng.uniform(-360, 360))
        if i % 4 == 0:  # force heavy overlap for a quarter of the cases
            cx, cy = sum(p[0] for p in a) / 4, sum(p[1] for p in a) / 4
            b = rotated(cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3), rng.uniform(1, 40),
                        rng.uniform(1, 40), rng.uniform(0, 180))
        else:
            b = rotated(rng.uniform(20, 80), rng.uniform(20, 80), rng.uniform(1, 40),
                        rng.uniform(1, 40), rng.uniform(0, 90))
        pa, pb = Polygon(a), Polygon(b)
        inter = pa.intersection(pb).area
        expect = inter / (pa.area + pb.area - inter)
        got = polygon_iou(a, b)
        assert abs(got - expect) < 1e-6, (i, got, expect)
        # corner order and orientation do not matter
        a2 = a[:]
        rng.shuffle(a2)
        assert abs(polygon_iou(a2, b[::-1]) - expect) < 1e-6
        assert abs(polygon_iou(b, a) - expect) < 1e-6


def test_polygon_iou_hand_cases():
    assert polygon_iou(rect(0, 0, 10, 10), rect(0, 0, 10, 10)) == pytest.approx(1.0)
    assert polygon_iou(rect(0, 0, 10, 10), rect(5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert polygon_iou(rect(0, 0, 10, 10), rect(20, 20, 30, 30)) == 0.0
    assert polygon_iou(rect(0, 0, 10, 10), rect(10, 0, 20, 10)) == 0.0  # touching edge
    assert polygon_iou(rect(0, 0, 10, 10), rect(2, 2, 4, 4)) == pytest.approx(4 / 100)
    # degenerate (zero area) boxes
    assert polygon_iou(rect(5, 0, 5, 10), rect(0, 0, 10, 10)) == 0.0
    assert polygon_iou(rect(5, 5, 5, 5), rect(5, 5, 5, 5)) == 0.0
    assert polygon_iou([], rect(0, 0, 1, 1)) == 0.0
    # 45-degree diamond inside a square: area 50 of 100
    diamond = [(5, 0), (10, 5), (5, 10), (0, 5)]
    assert polygon_iou(diamond, rect(0, 0, 10, 10)) == pytest.approx(0.5)
