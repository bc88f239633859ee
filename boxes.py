"""GeoChat's boxes: the text format, its one rotation convention, and polygon geometry.

Pure Python (no torch, numpy or PIL), so `eval.py score` runs on any machine.

Format: `{<x1><y1><x2><y2>|<θ>}`, integers on a 0-100 grid over the padded square image; `|<θ>`
may be absent (θ = 0). Several boxes concatenate (`{...}{...}`) and `<p>label</p>` before a group
labels it: `<p>two planes</p> {<8><82><16><90>|<69>}{<6><44><14><48>|<32>}`.

Rotation (the only convention in this project, the reference demo's `cv2.getRotationMatrix2D`):
the object is the axis-aligned box x1..x2, y1..y2 turned about its centre by θ degrees,
counter-clockwise as seen on screen (image y pointing down). A corner at offset (dx, dy) from the
centre goes to (dx cos θ + dy sin θ, -dx sin θ + dy cos θ). The reference's other helper and some
third-party scorers turn the other way; on the paper's figures this way sits on the objects.
"""

import math
import re
from dataclasses import dataclass

Point = tuple[float, float]
_EPS = 1e-12
# Every value a box string holds (0-100 on the grid, θ 0-89), written as a tokenizer would hold each as one piece
# (`synthetic/prepare.py tokenizer --box-pieces`; `train.py --box-value-sigma` reads the values through them).
BOX_VALUE_PIECES = tuple(f"<{v}>" for v in range(101))


@dataclass
class Box:
    """A box on the 0-100 grid over the padded square image; angle in degrees (see box_polygon_grid)."""
    x1: float
    y1: float
    x2: float
    y2: float
    angle: float = 0.0
    label: str | None = None


# -----------------------------------------------------------------------------
# text

_NUMBER = r"<\s*(-?\d+(?:\.\d+)?)\s*>"
_BOX_RE = re.compile(r"\{\s*" + r"\s*".join([_NUMBER] * 4) + r"\s*(?:\|\s*" + _NUMBER + r"\s*)?\}")
_LABEL_RE = re.compile(r"<p>([^{}]*?)</p>")  # a label holds no braces, so it never swallows a box
_BETWEEN_BOXES_RE = re.compile(r"(?:[\s,;]|\{[^{}]*\}?)*")  # what may sit between a label and its boxes


def parse_boxes(text):
    """Every {<x1><y1><x2><y2>|<θ>} in text (θ optional), labelled by the <p>label</p> right before its group."""
    events = [(m.start(), m.end(), "label", m.group(1).strip()) for m in _LABEL_RE.finditer(text)]
    events += [(m.start(), m.end(), "box", m) for m in _BOX_RE.finditer(text)]
    events.sort(key=lambda event: event[0])
    boxes, label, position = [], None, 0
    for start, end, kind, payload in events:
        if kind == "label":
            label = payload
        else:
            if not _BETWEEN_BOXES_RE.fullmatch(text, position, start):
                label = None  # other words since the label: the label does not reach this box
            x1, y1, x2, y2, angle = (float(v) if v is not None else 0.0 for v in payload.groups())
            boxes.append(Box(x1, y1, x2, y2, angle, label))
        position = end
    return boxes


def format_box(box):
    """Box -> "{<x1><y1><x2><y2>|<θ>}" with integers (half rounds up)."""
    x1, y1, x2, y2, angle = (int(math.floor(v + 0.5)) for v in (box.x1, box.y1, box.x2, box.y2, box.angle))
    return f"{{<{x1}><{y1}><{x2}><{y2}>|<{angle}>}}"


# -----------------------------------------------------------------------------
# geometry


def box_polygon_grid(box):
    """The 4 corners on the 0-100 grid: (x1, y1), (x2, y1), (x2, y2), (x1, y2), each turned by `angle` about the centre."""
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    cos, sin = math.cos(math.radians(box.angle)), math.sin(math.radians(box.angle))
    corners = [(box.x1, box.y1), (box.x2, box.y1), (box.x2, box.y2), (box.x1, box.y2)]
    return [(cx + (x - cx) * cos + (y - cy) * sin, cy - (x - cx) * sin + (y - cy) * cos) for x, y in corners]


def box_polygon(box, width, height):
    """The 4 corners in original-image pixels of a width x height image (grid spans the padded square)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = max(width, height)
    offset_x, offset_y = (side - width) // 2, (side - height) // 2
    return [(x * side / 100 - offset_x, y * side / 100 - offset_y) for x, y in box_polygon_grid(box)]


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def convex_hull(points) -> list[Point]:
    """Counter-clockwise convex hull (monotone chain), collinear points dropped."""
    pts = sorted(set((float(x), float(y)) for x, y in points))
    if len(pts) < 3:
        return pts
    lower: list[Point] = []
    for p in pts:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[Point] = []
    for p in reversed(pts):
        while len(upper) >= 2 and _cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def polygon_area(poly) -> float:
    """Shoelace area of a simple polygon (either orientation)."""
    s = 0.0
    for i in range(len(poly)):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % len(poly)]
        s += x1 * y2 - x2 * y1
    return abs(s) / 2.0


def _clip(subject: list[Point], clipper: list[Point]) -> list[Point]:
    """Sutherland-Hodgman: subject clipped by a convex counter-clockwise clipper."""
    out = subject
    for i in range(len(clipper)):
        a, b = clipper[i], clipper[(i + 1) % len(clipper)]
        inp, out = out, []
        if not inp:
            break
        s = inp[-1]
        ds = _cross(a, b, s)
        for e in inp:
            de = _cross(a, b, e)
            if de >= 0:
                if ds < 0:
                    t = ds / (ds - de)
                    out.append((s[0] + t * (e[0] - s[0]), s[1] + t * (e[1] - s[1])))
                out.append(e)
            elif ds >= 0:
                t = ds / (ds - de)
                out.append((s[0] + t * (e[0] - s[0]), s[1] + t * (e[1] - s[1])))
            s, ds = e, de
    return out


def polygon_iou(poly_a, poly_b) -> float:
    """Exact area IoU of two convex polygons (corner order free; zero-area polygons give 0.0)."""
    a, b = convex_hull(poly_a), convex_hull(poly_b)
    if len(a) < 3 or len(b) < 3:
        return 0.0
    area_a, area_b = polygon_area(a), polygon_area(b)
    if area_a <= _EPS or area_b <= _EPS:
        return 0.0
    inter_poly = _clip(a, b)
    inter = polygon_area(inter_poly) if len(inter_poly) >= 3 else 0.0
    union = area_a + area_b - inter
    if union <= _EPS:
        return 0.0
    return min(1.0, max(0.0, inter / union))


def match_boxes(predicted: list, known: list, threshold: float = 0.5) -> list:
    """Greedy one-to-one matching of predicted (name, polygon) to known ones of the same name, best pairs first.

    Returns [(iou, predicted index, known index)] for the pairs matched at IoU >= threshold.
    """
    pairs = sorted(((polygon_iou(p_poly, k_poly), i, j) for i, (p_name, p_poly) in enumerate(predicted)
                    for j, (k_name, k_poly) in enumerate(known) if p_name == k_name), reverse=True)
    used_p, used_k, matched = set(), set(), []
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_p and j not in used_k:
            used_p.add(i)
            used_k.add(j)
            matched.append((iou, i, j))
    return matched


def polygon_intersection(poly_a, poly_b) -> list[Point]:
    """The convex polygon shared by two convex polygons (corner order free); [] when they do not overlap."""
    a, b = convex_hull(poly_a), convex_hull(poly_b)
    if len(a) < 3 or len(b) < 3:
        return []
    shared = _clip(a, b)
    return shared if len(shared) >= 3 else []


def pixels_to_grid(points, width, height) -> list[Point]:
    """Points in original-image pixels of a width x height image -> the 0-100 grid (inverse of box_polygon's mapping)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = max(width, height)
    offset_x, offset_y = (side - width) // 2, (side - height) // 2
    return [((x + offset_x) * 100 / side, (y + offset_y) * 100 / side) for x, y in points]


def box_from_polygon(points, label=None) -> Box:
    """The smallest-area rotated rectangle holding the points, as a Box in this file's convention (θ in [0, 90)).

    Rotating calipers over the convex hull: one side of the best rectangle lies on a hull edge. The
    rectangle's side along direction (cos φ, sin φ) on screen is the box's x1..x2 side turned by θ = -φ;
    a w x h box at θ + 90 is the h x w box at θ, which brings θ into [0, 90). ValueError for fewer than
    three distinct non-collinear points.
    """
    hull = convex_hull(points)
    if len(hull) < 3 or polygon_area(hull) <= _EPS:
        raise ValueError(f"degenerate polygon {list(points)}: it encloses no area")
    best = None
    for i in range(len(hull)):
        (ax, ay), (bx, by) = hull[i], hull[(i + 1) % len(hull)]
        length = math.hypot(bx - ax, by - ay)
        ux, uy = (bx - ax) / length, (by - ay) / length  # along the edge
        along = [x * ux + y * uy for x, y in hull]
        across = [-x * uy + y * ux for x, y in hull]  # along (-uy, ux)
        area = (max(along) - min(along)) * (max(across) - min(across))
        if best is None or area < best[0] - _EPS:
            best = (area, ux, uy, min(along), max(along), min(across), max(across))
    _, ux, uy, a_lo, a_hi, c_lo, c_hi = best
    a_mid, c_mid = (a_lo + a_hi) / 2, (c_lo + c_hi) / 2
    cx, cy = a_mid * ux - c_mid * uy, a_mid * uy + c_mid * ux
    w, h = a_hi - a_lo, c_hi - c_lo
    theta = (-math.degrees(math.atan2(uy, ux))) % 180.0
    if theta >= 90.0:
        theta, w, h = theta - 90.0, h, w
    if theta >= 90.0 - 1e-9:  # float noise at the wrap-around
        theta, w, h = 0.0, h, w
    return Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, theta, label)
