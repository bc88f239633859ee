"""Synthetic aerial scenes for Baby GeoChat: images, exact rotated boxes, questions and answers.

A deterministic generator of tiny remote-sensing-like images (four ground textures, up to three
objects of five classes), with GeoChat_Instruct-style training conversations for every task and
GeoChat-Bench-style question rows for held-out images. Pure numpy + Pillow; everything is a
function of the seed. `synthetic/prepare.py` writes the files; nothing in the model imports this.

Boxes use the project's one format and rotation convention (boxes.py) on the 0-100 grid over
the square image: grid value g is the continuous pixel coordinate g * size / 100, and pixel
(i, j) covers [i, i+1) x [j, j+1). θ is an integer in [0, 90): a w x h box at θ + 90 is the
h x w box at θ, and the generator always emits the θ in [0, 90) form (storage tanks, being
circles, have θ = 0). The box is the ground truth: objects are sampled directly as integer grid
boxes and drawn inside them, so the box string is exact (no rounding).
"""

import math
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from boxes import Box, box_polygon_grid, format_box, polygon_area, polygon_intersection, polygon_iou  # noqa: E402
from data import task_prompt  # noqa: E402
from eval import BENCHES, question_prompt  # noqa: E402

SCENE_CLASSES = ("farmland", "water", "desert", "urban")
OBJECT_CLASSES = ("plane", "ship", "storage tank", "vehicle", "building")
TASKS = ("grounding", "refer", "identify", "presence", "count", "comparison", "scene")
PRETEXT_TASKS = ("grid",)  # first-stage only: not a GeoChat task, never in the bench files

PLURALS = {"plane": "planes", "ship": "ships", "storage tank": "storage tanks",
                 "vehicle": "vehicles", "building": "buildings"}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
SCENE_PHRASES = {"farmland": "a farmland scene", "water": "a water scene",
                       "desert": "a desert scene", "urban": "an urban scene"}

# which object classes may appear on which ground (relative weights); ships only on water
SCENE_OBJECTS = {
    "farmland": {"building": 3, "vehicle": 3, "storage tank": 2, "plane": 1},
    "water": {"ship": 1},
    "desert": {"plane": 3, "storage tank": 3, "vehicle": 2, "building": 1},
    "urban": {"building": 3, "vehicle": 3, "storage tank": 1, "plane": 1},
}
N_OBJECTS_WEIGHTS = (0.1, 0.3, 0.3, 0.3)  # P(0, 1, 2, 3 objects)
PRESENCE_YES = 0.5 / (1.0 - N_OBJECTS_WEIGHTS[0])  # balances yes/no over scenes

# object size ranges on the 0-100 grid: (length range, breadth range or ratio range)
SIZE_GRID = {
    "plane": ((22, 33), None),          # breadth (wingspan) = length * U(0.85, 1.05)
    "ship": ((16, 31), (5, 9)),
    "storage tank": ((10, 19), None),   # circle: breadth = length, θ = 0
    "vehicle": ((8, 12), (5, 7)),
    "building": ((12, 28), (10, 22)),
}
COLORS = {  # one colour family per class, so that a few-million-parameter model can learn them on a CPU
    "plane": ((240, 240, 240), (214, 214, 222)),
    "ship": ((196, 42, 36), (235, 120, 30)),
    "storage tank": ((250, 215, 60),),
    "vehicle": ((40, 90, 235), (20, 200, 210)),
    "building": ((150, 60, 45), (120, 44, 40), (178, 98, 66), (62, 60, 78)),
}
MARGIN_GRID = 1.0     # objects keep this far from the image border (grid units)
GAP_GRID = 2.0        # and this far from each other (grid units)

# referring size groups by the target's (mean) box area w*h on the 0-100 grid
SIZE_SMALL_MAX = 150   # area < 150 -> "small" (vehicles, small tanks)
SIZE_MEDIUM_MAX = 400  # 150 <= area < 400 -> "medium"; otherwise "large"

# The grid pretext task: which object class covers each cell of a GRID_CELLS x GRID_CELLS grid (the baby's
# patch grid), row by row, one digit a cell. Every answer token is read off one patch, so a first stage
# on it teaches the tower what each patch holds and the decoder to read image tokens, before presence
# and boxes ask it to search the patches for a class.
GRID_CELLS = 8
GRID_MIN_COVER = 0.2  # a cell takes an object's class when the object's box covers this share of it
GRID_PROMPT = ("[grid] For each cell of an %dx%d grid over the image, row by row, which object covers it? %s."
               % (GRID_CELLS, GRID_CELLS, ", ".join(["0 ground"] + ["%d %s" % (i + 1, c) for i, c in enumerate(OBJECT_CLASSES)])))
SCENE_PROMPT = task_prompt("scene", classes=SCENE_CLASSES)
GROUNDING_PROMPT = task_prompt("grounding")


# ------------------------------------------------------------------------------ boxes

def _overlap(p, q):
    """Whether two convex polygons share area (touching edges do not count)."""
    return polygon_iou(p, q) > 0.0


def _sample_object(rng, cls, scale=1.0):
    """Sample (length, breadth, direction deg in [0,360)) for one object class, grid units, sizes times scale."""
    (lo, hi), br = SIZE_GRID[cls]
    length = rng.randint(round(lo * scale), round(hi * scale))
    if cls == "plane":
        breadth = max(8, int(round(length * rng.uniform(0.85, 1.05))))
    elif cls == "storage tank":
        breadth = length
    elif cls == "building":
        breadth = min(length, rng.randint(round(br[0] * scale), round(br[1] * scale)))
    else:
        breadth = rng.randint(round(br[0] * scale), round(br[1] * scale))
    direction = 0 if cls == "storage tank" else rng.randrange(360)
    return length, breadth, direction


def _place(rng, cls, placed_polys, tries=30, scale=1.0):
    """Rejection-sample a non-overlapping, fully-inside integer grid box for one object."""
    for _ in range(tries):
        length, breadth, direction = _sample_object(rng, cls, scale)
        phi = direction % 180
        if phi < 90:
            w, h, theta = length, breadth, phi
        else:
            w, h, theta = breadth, length, phi - 90
        c, s = abs(math.cos(math.radians(theta))), abs(math.sin(math.radians(theta)))
        ex, ey = (w * c + h * s) / 2.0, (w * s + h * c) / 2.0
        x_lo = math.ceil(MARGIN_GRID + ex - w / 2.0)
        x_hi = math.floor(100 - MARGIN_GRID - ex - w / 2.0)
        y_lo = math.ceil(MARGIN_GRID + ey - h / 2.0)
        y_hi = math.floor(100 - MARGIN_GRID - ey - h / 2.0)
        # the pre-rotation box itself must also lie on the 0..100 grid
        x_lo, y_lo = max(x_lo, 0), max(y_lo, 0)
        x_hi, y_hi = min(x_hi, 100 - w), min(y_hi, 100 - h)
        if x_lo > x_hi or y_lo > y_hi:
            continue
        x1, y1 = rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi)
        grid = (x1, y1, x1 + w, y1 + h, theta)
        # collision test on boxes grown by the gap
        g = GAP_GRID / 2.0
        grown = box_polygon_grid(Box(x1 - g, y1 - g, x1 + w + g, y1 + h + g, theta))
        if any(_overlap(grown, other) for other in placed_polys):
            continue
        placed_polys.append(grown)
        return grid, direction
    return None


# ------------------------------------------------------------------------------ textures

def _smooth_noise(nrng, size, cells):
    """Smooth noise in about [-1, 1]: a cells x cells normal grid bicubically upsampled."""
    small = nrng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 1.5


def _rotated_coords(size, angle_deg, nrng):
    """Pixel-centre coordinates rotated by angle: (u along the angle, v across it)."""
    t = (np.arange(size, dtype=np.float32) + 0.5)
    x, y = t[None, :], t[:, None]
    a = math.radians(angle_deg)
    off = nrng.uniform(0, 1000, 2)
    u = x * math.cos(a) - y * math.sin(a) + off[0]
    v = x * math.sin(a) + y * math.cos(a) + off[1]
    return u, v


def _texture(scene, size, nrng):
    """Float32 (size, size, 3) RGB ground texture for a scene class."""
    fine = nrng.standard_normal((size, size, 1)).astype(np.float32)
    if scene == "farmland":
        palette = np.array([(92, 138, 60), (120, 158, 70), (70, 112, 50), (176, 168, 88),
                            (196, 178, 104), (150, 124, 80), (104, 146, 84)], np.float32)
        palette += nrng.uniform(-10, 10, (1, 3)).astype(np.float32)
        u, v = _rotated_coords(size, nrng.uniform(0, 180), nrng)
        sw = nrng.uniform(10, 22) * size / 128.0
        pl = nrng.uniform(40, 90) * size / 128.0
        iu, iv = np.floor(u / sw).astype(np.int64), np.floor(v / pl).astype(np.int64)
        table = nrng.integers(0, len(palette), (64, 64))
        img = palette[table[iu % 64, iv % 64]]
        frac = (u / sw) % 1.0
        edge = (frac < 0.08).astype(np.float32)[..., None]
        img = img * (1.0 - 0.15 * edge)
        rows = 0.5 + 0.5 * np.sin(u * (2 * math.pi / max(2.0, sw / 4.0)))
        img += (rows[..., None] - 0.5) * 8.0
        img += _smooth_noise(nrng, size, 4)[..., None] * 8.0 + fine * 3.0
    elif scene == "water":
        base = np.array((30, 72, 118), np.float32) + nrng.uniform(-10, 10, 3).astype(np.float32)
        n = _smooth_noise(nrng, size, 4) * 0.7 + _smooth_noise(nrng, size, 10) * 0.3
        img = base[None, None, :] + n[..., None] * np.array((6, 10, 12), np.float32) + fine * 2.0
    elif scene == "desert":
        base = np.array((206, 176, 126), np.float32) + nrng.uniform(-12, 12, 3).astype(np.float32)
        u, _ = _rotated_coords(size, nrng.uniform(0, 180), nrng)
        lam = nrng.uniform(14, 26) * size / 128.0
        warp = _smooth_noise(nrng, size, 3)
        dunes = np.sin(2 * math.pi * (u / lam + 0.6 * warp))
        img = (base[None, None, :] + dunes[..., None] * 11.0
               + _smooth_noise(nrng, size, 5)[..., None] * 8.0 + fine * 3.0)
    elif scene == "urban":
        t = np.arange(size, dtype=np.float32) + 0.5
        spacing = nrng.uniform(30, 46) * size / 128.0
        street = nrng.uniform(3.5, 5.5) * size / 128.0
        ox, oy = nrng.uniform(0, spacing, 2)
        bx = np.floor((t + ox) / spacing).astype(np.int64)
        by = np.floor((t + oy) / spacing).astype(np.int64)
        sx, sy = ((t + ox) % spacing) < street, ((t + oy) % spacing) < street
        shades = nrng.uniform(132, 172, (16, 16)).astype(np.float32)
        block = shades[by[:, None] % 16, bx[None, :] % 16]
        img = block[..., None] + np.array((0, 0, 3), np.float32) + fine * 6.0
        img += _smooth_noise(nrng, size, 6)[..., None] * 5.0
        road = (sy[:, None] | sx[None, :])
        img[road] = np.array((88, 88, 92), np.float32) + fine[road] * 2.0
    else:
        raise ValueError(f"unknown scene class {scene!r}")
    return img


# ------------------------------------------------------------------------------ object drawing

def _fill_convex(arr, poly, color):
    """Paint the pixels of arr whose centres lie in a convex polygon (pixel coords, y down)."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    h, w = arr.shape[:2]
    c0, c1 = max(0, int(math.floor(min(xs)))), min(w, int(math.ceil(max(xs))) + 1)
    r0, r1 = max(0, int(math.floor(min(ys)))), min(h, int(math.ceil(max(ys))) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    px = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
    py = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
    pos = np.ones((r1 - r0, c1 - c0), bool)
    neg = np.ones((r1 - r0, c1 - c0), bool)
    n = len(poly)
    for i in range(n):
        ax, ay = poly[i]
        bx, by = poly[(i + 1) % n]
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        pos &= cross >= 0
        neg &= cross <= 0
    arr[r0:r1, c0:c1][pos | neg] = color


def _fill_disc(arr, cx, cy, r, color):
    """Paint the pixels of arr whose centres lie within distance r of (cx, cy)."""
    h, w = arr.shape[:2]
    c0, c1 = max(0, int(math.floor(cx - r))), min(w, int(math.ceil(cx + r)) + 1)
    r0, r1 = max(0, int(math.floor(cy - r))), min(h, int(math.ceil(cy + r)) + 1)
    px = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5 - cx
    py = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5 - cy
    arr[r0:r1, c0:c1][px * px + py * py <= r * r] = color


def _draw_object(arr, cls, grid, direction, color, size):
    """Draw one object into a uint8 (size, size, 3) array inside its grid box.

    `direction` is the object's nose direction in degrees (counter-clockwise on screen); a
    pixel is painted iff its centre lies in one of the object's convex parts, all of which lie
    in the rotated box, so the box string describes the drawn pixels exactly.
    """
    x1, y1, x2, y2, theta = grid
    s = size / 100.0
    cx, cy = (x1 + x2) / 2.0 * s, (y1 + y2) / 2.0 * s
    phi = direction % 180
    length, breadth = ((x2 - x1), (y2 - y1)) if phi < 90 else ((y2 - y1), (x2 - x1))
    L, B = length * s, breadth * s
    a = math.radians(direction)
    c, sn = math.cos(a), math.sin(a)

    def part(local, col):  # local (a along the nose, b across) in units of L, B
        _fill_convex(arr, [(cx + p * L * c + q * B * sn, cy - p * L * sn + q * B * c)
                                 for p, q in local], col)

    if cls == "plane":
        part([(-0.5, -0.08), (0.36, -0.08), (0.5, 0.0), (0.36, 0.08), (-0.5, 0.08)], color)
        for side in (-1, 1):
            part([(0.18, 0.0), (-0.08, 0.5 * side), (-0.24, 0.5 * side), (-0.12, 0.0)], color)
            part([(-0.32, 0.0), (-0.46, 0.22 * side), (-0.5, 0.22 * side), (-0.5, 0.0)], color)
    elif cls == "ship":
        part([(-0.5, -0.5), (0.2, -0.5), (0.5, 0.0), (0.2, 0.5), (-0.5, 0.5)], color)
        part([(-0.36, -0.26), (-0.08, -0.26), (-0.08, 0.26), (-0.36, 0.26)], (150, 150, 156))
    elif cls == "storage tank":
        _fill_disc(arr, cx, cy, L / 2.0, (168, 168, 174))
        _fill_disc(arr, cx, cy, L / 2.0 * 0.78, color)
    elif cls == "vehicle":
        part([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)], color)
        part([(0.12, -0.4), (0.3, -0.4), (0.3, 0.4), (0.12, 0.4)], (30, 30, 40))
    elif cls == "building":
        part([(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)], color)
        shade = tuple(int(v * 0.75) for v in color)
        part([(-0.5, 0.0), (0.5, 0.0), (0.5, 0.5), (-0.5, 0.5)], shade)
    else:
        raise ValueError(f"unknown object class {cls!r}")


def _reading_key(obj):
    x1, y1, x2, y2, _ = obj["grid"]
    return (y1 + y2, x1 + x2)


def make_scene(rng_seed, size=128, draw_objects=True, object_scale=1.0):
    """Deterministically generate one synthetic aerial scene: (PIL RGB image, annotation dict).

    object_scale multiplies the objects' sizes (an easier world for a first stage: 2.5 makes a vehicle
    as large as a patch); objects that no longer fit are left out, so large scales mean fewer objects.
    """
    seed = int(rng_seed)
    rng = random.Random(seed)
    nrng = np.random.default_rng([seed, 1])
    scene = SCENE_CLASSES[rng.randrange(len(SCENE_CLASSES))]
    n_obj = rng.choices(range(len(N_OBJECTS_WEIGHTS)), weights=N_OBJECTS_WEIGHTS)[0]
    allowed = SCENE_OBJECTS[scene]
    classes, weights = list(allowed), list(allowed.values())
    placed, objects = [], []
    for _ in range(n_obj):
        cls = rng.choices(classes, weights=weights)[0]
        res = _place(rng, cls, placed, scale=object_scale)
        if res is None:
            continue
        grid, direction = res
        color = rng.choice(COLORS[cls])
        objects.append({"class": cls, "grid": list(grid), "direction": direction,
                        "color": list(color)})
    objects.sort(key=_reading_key)
    s = size / 100.0
    for o in objects:
        x1, y1, x2, y2, theta = o["grid"]
        o["box"] = format_box(Box(x1, y1, x2, y2, theta))
        o["rbox"] = [(x1 + x2) / 2.0 * s, (y1 + y2) / 2.0 * s, (x2 - x1) * s, (y2 - y1) * s,
                     float(theta)]
    tex = _texture(scene, size, nrng)
    arr = np.clip(tex + 0.5, 0, 255).astype(np.uint8)
    if draw_objects:
        for o in objects:
            _draw_object(arr, o["class"], o["grid"], o["direction"], o["color"], size)
    img = Image.fromarray(arr)
    ann = {"seed": seed, "size": size, "scene": scene, "objects": objects}
    return img, ann


# ------------------------------------------------------------------------------ questions

def class_counts(ann):
    """The scene's number of objects of every class, {class: n} in OBJECT_CLASSES order."""
    counts = {c: 0 for c in OBJECT_CLASSES}
    for o in ann["objects"]:
        counts[o["class"]] += 1
    return counts


def _group_phrase(cls, n):
    return "%s %s" % (NUMBER_WORDS[n], cls if n == 1 else PLURALS[cls])


def description_head(scene):
    """How a grounded description of a scene with this ground begins: "The image shows a water scene"."""
    return "The image shows %s" % SCENE_PHRASES[scene]


def grounded_description(ann):
    """Grounded description: scene phrase + `<p>two ships</p> {box}{box}` groups, reading order."""
    groups = {}
    for o in ann["objects"]:
        groups.setdefault(o["class"], []).append(o["box"])
    head = description_head(ann["scene"])
    if not groups:
        return head + " with no notable objects."
    parts = ["<p>%s</p> %s" % (_group_phrase(c, len(b)), "".join(b))
             for c, b in groups.items()]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return "%s with %s." % (head, body)


def refer_targets(ann):
    """Referring targets: (expression, obj_ids) per class present: "the X" once, "all Xs" more."""
    out = []
    by_cls = {}
    for i, o in enumerate(ann["objects"]):
        by_cls.setdefault(o["class"], []).append(i)
    for cls, ids in by_cls.items():
        out.append(("the " + cls if len(ids) == 1 else "all " + PLURALS[cls], ids))
    return out


def region_caption(cls):
    """The region caption of an object class (the one form used everywhere): 'A ship.'."""
    return "A %s." % cls


def _size_group(ann, ids):
    areas = []
    for i in ids:
        x1, y1, x2, y2, _ = ann["objects"][i]["grid"]
        areas.append((x2 - x1) * (y2 - y1))
    a = sum(areas) / len(areas)
    if a < SIZE_SMALL_MAX:
        return "small"
    return "medium" if a < SIZE_MEDIUM_MAX else "large"


# A turn's facts: ("scene",), ("presence", cls), ("count", cls), ("more", frozenset({a, b})), ("box", i) and
# ("class", i) of object i, ("grid",). Each question generator returns (question, answer, the facts its answer
# states, the facts the turn gives away); instruct_records orders a record's turns so that no answer was given away
# by an earlier turn.

def _presence(ann, rng):
    """(question, answer, facts stated, facts given away) of a presence question."""
    counts = class_counts(ann)
    present = [c for c in OBJECT_CLASSES if counts[c]]
    absent = [c for c in OBJECT_CLASSES if not counts[c]]
    yes = bool(present) and rng.random() < PRESENCE_YES
    cls = rng.choice(present if yes else absent)
    told = {("presence", cls)} if yes else {("presence", cls), ("count", cls)}  # "No" also says there are 0
    return "Is there a %s in the image?" % cls, ("Yes" if yes else "No"), {("presence", cls)}, told


def _count(ann, rng):
    """(question, answer, facts stated, facts given away) of a count question."""
    counts = class_counts(ann)
    present = [c for c in OBJECT_CLASSES if counts[c]]
    pool = present if present and rng.random() < 0.75 else list(OBJECT_CLASSES)
    cls = rng.choice(pool)
    return ("How many %s are there in the image?" % PLURALS[cls], str(counts[cls]), {("count", cls)},
            {("count", cls), ("presence", cls)})


def _comparison(ann, rng):
    """(question, answer, facts stated, facts given away) of a comparison, or None when all counts are equal."""
    counts = class_counts(ann)
    pairs = [(a, b) for i, a in enumerate(OBJECT_CLASSES) for b in OBJECT_CLASSES[i + 1:]
             if counts[a] != counts[b]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    q = "Are there more %s than %s?" % (PLURALS[a], PLURALS[b])
    # a "Yes" also implies that the first class is present; counting that would leave 39% "Yes" among the comparisons
    # a record can keep, so it is not counted
    more = {("more", frozenset((a, b)))}
    return q, ("Yes" if counts[a] > counts[b] else "No"), more, more


def cell_objects(ann, cells=GRID_CELLS):
    """Per cell of a cells x cells grid, row by row: the index of the object whose box covers most of it (at least
    GRID_MIN_COVER of the cell), else -1. The labels of the grid task and of the vision tower's pretraining."""
    step = 100.0 / cells
    best = [(0.0, -1)] * (cells * cells)  # (covered area, object index) per cell
    for i, o in enumerate(ann["objects"]):
        poly = box_polygon_grid(Box(*o["grid"]))
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        for row in range(max(0, int(min(ys) // step)), min(cells, int(max(ys) // step) + 1)):
            for col in range(max(0, int(min(xs) // step)), min(cells, int(max(xs) // step) + 1)):
                x0, y0 = col * step, row * step
                cell = [(x0, y0), (x0 + step, y0), (x0 + step, y0 + step), (x0, y0 + step)]
                area = polygon_area(polygon_intersection(poly, cell))
                if area >= GRID_MIN_COVER * step * step and area > best[row * cells + col][0]:
                    best[row * cells + col] = (area, i)
    return [i for _, i in best]


def grid_answer(ann, cells=GRID_CELLS):
    """The grid task's answer: cells*cells digits, row by row: 1 + OBJECT_CLASSES index of the object that covers
    the cell (cell_objects), else 0."""
    return "".join("0" if i < 0 else str(OBJECT_CLASSES.index(ann["objects"][i]["class"]) + 1)
                   for i in cell_objects(ann, cells))


MAX_DRAWS = 20  # instruct_records: draws for a question it may ask before the record ends early


# in a scene without objects, a task that needs one is replaced by another (never by presence,
# so that every scene gets the same share of presence questions and yes/no stays balanced)
EMPTY_SCENE_SUBSTITUTE = {"refer": "grounding", "identify": "scene", "comparison": "count"}


def task_cycle(ann, tasks=TASKS):
    """One cycle of tasks for a scene: `tasks`, object tasks substituted in empty scenes."""
    if ann["objects"]:
        return list(tasks)
    return [EMPTY_SCENE_SUBSTITUTE.get(t, t) for t in tasks]


def all_facts(ann):
    """Every fact a scene's questions can ask about (what a grounded description gives away)."""
    n = len(ann["objects"])
    return ({("scene",)} | {(kind, c) for c in OBJECT_CLASSES for kind in ("presence", "count")}
            | {(kind, i) for i in range(n) for kind in ("box", "class")})


def question_turn(ann, task, rng):
    """One (human prompt, gpt answer, facts its answer states, facts the turn gives away) of a task for a scene;
    rng picks the target."""
    if task == "grounding":  # the description states every fact
        facts = all_facts(ann)
        return GROUNDING_PROMPT, grounded_description(ann), facts, facts
    if task == "refer":
        return refer_turn(ann, *rng.choice(refer_targets(ann)))
    if task == "identify":
        i = rng.randrange(len(ann["objects"]))
        o = ann["objects"][i]
        return (task_prompt("identify", box=o["box"]), region_caption(o["class"]), {("class", i)},
                {("class", i), ("box", i), ("presence", o["class"])})
    if task in ("presence", "count", "comparison"):
        turn = {"presence": _presence, "count": _count, "comparison": _comparison}[task](ann, rng)
        return None if turn is None else (task_prompt("vqa", question=turn[0]),) + turn[1:]
    if task == "scene":
        return SCENE_PROMPT, ann["scene"], {("scene",)}, {("scene",)}
    if task == "grid":  # the digits name the class of every cell: every class's presence
        return GRID_PROMPT, grid_answer(ann), {("grid",)}, {("grid",)} | {("presence", c) for c in OBJECT_CLASSES}
    raise ValueError(f"unknown task {task!r}")


def refer_turn(ann, expr, ids):
    """The turn of a refer target (refer_targets), worded as the referring bench asks: "[refer] ..." for one object,
    "[grounding]all Xs" for several."""
    cls = ann["objects"][ids[0]]["class"]
    prompt = question_prompt("referring", {"question": expr, "type": "ref" if len(ids) == 1 else "grounding"})
    told = {("presence", cls), ("count", cls)} | {(kind, i) for i in ids for kind in ("box", "class")}
    return prompt, "".join(ann["objects"][i]["box"] for i in ids), {("box", i) for i in ids}, told


def question_answer(ann, task, rng):
    """One (human prompt, gpt answer) pair of a task for a scene; rng picks the target."""
    turn = question_turn(ann, task, rng)
    return None if turn is None else turn[:2]


def gives_nothing_away(turns) -> bool:
    """Whether no turn of a sequence states a fact that an earlier turn gave away (two counts give a comparison)."""
    known = set()
    for _, _, stated, told in turns:
        counted = {f[1] for f in known if f[0] == "count"}
        if stated & known or any(f[0] == "more" and f[1] <= counted for f in stated):
            return False
        known |= told
    return True


def may_follow(record, turn) -> bool:
    """Whether a turn may be asked after a record's turns without any answer given away by an earlier turn; a grounded
    description only as a record's first (and then only) question, as sample.py and the bench ask it."""
    if turn[0] == GROUNDING_PROMPT and record:
        return False
    return gives_nothing_away(record + [turn])


ASK_ORDER = ("presence", "count", "comparison", "scene", "grid", "identify", "refer", "grounding")  # kind_order's order


def instruct_records(ann, image_name, n_records=7, rng_seed=0, multi_turn_prob=0.25, tasks=TASKS, turns=(2, 3),
                     refuse_given_away=False, refer_every_class=False, kind_order=False):
    """GeoChat_Instruct records for one image; `tasks` cycle, so n_records >= len(tasks) covers each one. A share
    multi_turn_prob of the records ask turns[0] to turns[1] questions about the image, the others one.

    A record never asks a question twice (its answer could be copied from the earlier turn). With refuse_given_away,
    it also never asks one whose answer an earlier turn gave away another way (a count after "the plane", presence
    after a count, an identify after a description): a question that would is drawn again; a grounded description only
    opens a record (it gives every other answer away, so such a record holds it alone). Questions always come in the
    order drawn, so a record's first question is the task cycle's draw whatever follows it: inserting each question
    at a random place where nothing was given away instead put "Is there a plane?" before "the plane" and so made
    the first turn's presence answer "Yes" twice as often as "No" (and its count 0 more often), and the bench asks
    every question first.

    With refer_every_class, a record about a scene of several classes that asks one refer question asks it of every
    class (beyond turns[1] if need be), each after the record's other questions (where refuse_given_away allows it):
    the same image, a different box for each class named, so only the class decides which object the answer is.

    With kind_order, a record's first question stays the first drawn (the bench asks every kind first) and the later
    ones come in ASK_ORDER (presence, then count, ..., [refer] last) instead of the order drawn: each goes in at its
    kind's place and is kept if the whole record then gives nothing away. The order depends on the kind alone, never
    on an answer, and a "the plane" no longer refuses an "Is there a plane?" drawn after it (that now comes first,
    unless "the plane" opens the record), so refuse_given_away keeps more of presence's "Yes" and of the counts."""
    def may_ask(record, turn):  # may_follow already refuses a repeated question (its answer was given away)
        return may_follow(record, turn) if refuse_given_away else not any(turn[0] == asked[0] for asked in record)

    rng = random.Random("conv-%d-%d" % (int(ann["seed"]), int(rng_seed)))
    tasks = task_cycle(ann, tasks)
    cycle = []
    stem = Path(image_name).stem
    records = []
    for k in range(n_records):
        n_turns = 1 if rng.random() >= multi_turn_prob else rng.choice(range(turns[0], turns[1] + 1))
        record, ranks = [], []  # ranks: each turn's place in ASK_ORDER (kind_order only)
        for t in range(n_turns):
            for _ in range(MAX_DRAWS):
                if not cycle:
                    cycle = tasks[:]
                    rng.shuffle(cycle)
                task = cycle.pop()
                turn = question_turn(ann, task, rng)
                if turn is None:
                    continue
                if kind_order:
                    # the first question stays the first drawn (the bench asks every kind first); a later one goes
                    # after the turns of its kind and of earlier kinds
                    rank = ASK_ORDER.index(task)
                    at = 1 + sum(r <= rank for r in ranks[1:]) if record else 0
                    asked = record[:at] + [turn] + record[at:]
                    if all(may_ask(asked[:i], asked[i]) for i in range(len(asked))):
                        record, ranks = asked, ranks[:at] + [rank] + ranks[at:]
                        break
                elif may_ask(record, turn):
                    record.append(turn)
                    break
            else:
                break  # every draw would have repeated or given an answer away: the record ends here
        every_refer = [refer_turn(ann, *target) for target in refer_targets(ann)] if refer_every_class else []
        if len(every_refer) > 1 and any(turn[0] == asked[0] for turn in every_refer for asked in record):
            for turn in every_refer:
                if may_ask(record, turn):
                    record.append(turn)
        conv = []
        for t, (q, a, _, _) in enumerate(record):
            conv.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
            conv.append({"from": "gpt", "value": a})
        records.append({"id": "%s_%d" % (stem, k), "image": image_name, "conversations": conv})
    return records


def bench_questions(ann, image_name, rng_seed=0, start_qid=0):
    """GeoChat-Bench question rows for a held-out image, as the real files hold them: {bench: [rows]}, next question id."""
    rng = random.Random("bench-%d-%d" % (int(ann["seed"]), int(rng_seed)))
    stem = Path(image_name).stem
    out = {bench: [] for bench in BENCHES}
    qid = start_qid
    out["scene"].append({"question_id": "%s/%s" % (ann["scene"], image_name), "image": image_name,
                         "text": SCENE_PROMPT, "ground_truth": ann["scene"]})
    for cat, fn in (("presence", _presence), ("count", _count),
                    ("comparison", _comparison)):
        qa = fn(ann, rng)
        if qa is None:
            continue
        out["vqa"].append({"question_id": qid, "image": image_name,
                           "text": task_prompt("vqa", question=qa[0]), "category": cat,
                           "ground_truth": qa[1].lower()})
        qid += 1
    for expr, ids in refer_targets(ann):
        out["referring"].append({
            "question_id": qid, "image_id": stem, "image": image_name,
            "question": expr,
            "ground_truth": "".join(ann["objects"][i]["box"] for i in ids),
            "type": "ref" if len(ids) == 1 else "grounding", "obj_ids": ids,
            "size_group": _size_group(ann, ids), "dataset": "synthetic"})
        qid += 1
    for o in ann["objects"]:
        out["region_captioning"].append({"question_id": qid, "image": image_name,
                                         "question": o["box"],
                                         "ground_truth": region_caption(o["class"])})
        qid += 1
    return out, qid
