"""A large synthetic scene with known objects: the synthetic world's scenes composed into a mosaic.

`make_mosaic` lays cells x cells scenes of `cell` pixels (synthetic.scenes.make_scene, each from its own
seed) side by side, so a 16 x 16 mosaic of 125-px scenes is 2,000 pixels wide and holds a few hundred
objects whose rotated boxes are known exactly, in the mosaic's pixels. Shrunk to one model view, its
objects are a pixel or two wide; tiles at the scenes' own scale show them as the model was trained to see them.
"""

import random
from dataclasses import dataclass

from PIL import Image

from boxes import Box, box_polygon
from synthetic.scenes import make_scene


@dataclass
class KnownObject:
    """An object of the mosaic: its class and its rotated box's corners in mosaic pixels."""
    name: str
    polygon: list


def make_mosaic(seed: int = 0, cells: int = 16, cell: int = 125) -> tuple:
    """(RGB image of cells*cell pixels square, [KnownObject]) composed of cells x cells synthetic scenes."""
    rng = random.Random(seed)
    image = Image.new("RGB", (cells * cell, cells * cell))
    objects = []
    for row in range(cells):
        for col in range(cells):
            scene, annotation = make_scene(rng.randrange(2 ** 31), size=cell)
            image.paste(scene, (col * cell, row * cell))
            for obj in annotation["objects"]:
                x1, y1, x2, y2, angle = obj["grid"]
                corners = box_polygon(Box(x1, y1, x2, y2, angle), cell, cell)
                objects.append(KnownObject(obj["class"], [(x + col * cell, y + row * cell) for x, y in corners]))
    return image, objects
