"""Map coordinates: world files, GeoTIFF tags, and boxes written as GeoJSON.

Pixel coordinates here are continuous: pixel (i, j) covers [i, i+1) x [j, j+1), as in boxes.py. A
georeference is the affine map (x, y) -> (a x + b y + c, d x + e y + f) from those coordinates to map
coordinates, with the EPSG code of the map's reference system when the file names one.

- A world file (`.pgw`, `.jgw`, `.tfw`, ... or `.wld` beside the image) holds six numbers A, D, B, E, C, F:
  the map position of pixel (i, j)'s *centre* is (A i + B j + C, D i + E j + F).
- GeoTIFF tags: ModelTiepointTag (I, J, K, X, Y, Z) with ModelPixelScaleTag (Sx, Sy, Sz) put raster
  point (I, J) at (X, Y), x growing by Sx and y shrinking by Sy per pixel; or ModelTransformationTag
  (a 4 x 4 matrix). Raster points are pixel corners (PixelIsArea, the default) or pixel centres when
  GTRasterTypeGeoKey says PixelIsPoint. The EPSG code is ProjectedCSTypeGeoKey, else GeographicTypeGeoKey.
- With the optional `rasterio` installed, GeoTIFFs that Pillow cannot read (16-bit multiband) are read
  by it; nothing else needs it.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from boxes import polygon_area

WORLD_FILE_SUFFIXES = (".wld",)  # besides the per-format ones made by world_file_candidates
TIFF_SUFFIXES = (".tif", ".tiff")
TAG_PIXEL_SCALE, TAG_TIEPOINT, TAG_TRANSFORMATION, TAG_GEOKEYS = 33550, 33922, 34264, 34735
KEY_RASTER_TYPE, KEY_GEOGRAPHIC_TYPE, KEY_PROJECTED_TYPE = 1025, 2048, 3072
PIXEL_IS_POINT = 2
USER_DEFINED = 32767  # a GeoKey value meaning "not an EPSG code"


@dataclass(frozen=True)
class GeoReference:
    """Continuous pixel (x, y) -> map (a x + b y + c, d x + e y + f); epsg None when unknown; source names the file."""
    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    epsg: int | None = None
    source: str = ""

    def to_map(self, points) -> list:
        """Pixel points -> map points."""
        return [(self.a * x + self.b * y + self.c, self.d * x + self.e * y + self.f) for x, y in points]


def world_file_candidates(image_path) -> list:
    """The world files that may sit beside an image: `.pgw` for `.png` (first and last letter + w), `.pngw`, `.wld`."""
    path = Path(image_path)
    suffix = path.suffix
    names = []
    if len(suffix) >= 3:
        names += [suffix[:2] + suffix[-1] + "w", suffix + "w"]
    names += list(WORLD_FILE_SUFFIXES)
    candidates = []
    for name in names:
        for variant in (name.lower(), name.upper()):
            candidate = path.with_suffix(variant)
            if candidate not in candidates:
                candidates.append(candidate)
    return candidates


def read_world_file(path) -> GeoReference:
    """A world file's six numbers as a GeoReference (ValueError naming the file when it is not six finite numbers)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a world file (not text)") from None
    words = text.split()
    try:
        numbers = [float(w) for w in words]
    except ValueError:
        raise ValueError(f"{path}: not a world file (expected six numbers, found {words[:8]!r})") from None
    if len(numbers) != 6 or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{path}: not a world file (expected six finite numbers, found {len(numbers)})")
    A, D, B, E, C, F = numbers
    if A * E - B * D == 0:
        raise ValueError(f"{path}: world file with zero pixel size (its map is not invertible)")
    # pixel (i, j)'s centre is continuous (i + 0.5, j + 0.5)
    return GeoReference(A, B, C - 0.5 * A - 0.5 * B, D, E, F - 0.5 * D - 0.5 * E, None, str(path))


def _geokeys(directory) -> dict:
    """GeoKeyDirectoryTag -> {key id: value} for keys stored in the directory itself (short values)."""
    values = [int(v) for v in directory or ()]
    keys = {}
    for i in range(4, 4 + 4 * (values[3] if len(values) >= 4 else 0), 4):
        if i + 3 < len(values) and values[i + 1] == 0:
            keys[values[i]] = values[i + 3]
    return keys


def geotiff_reference(path) -> GeoReference | None:
    """The GeoReference in a TIFF's GeoTIFF tags; None when it has none (ValueError for tags that contradict themselves)."""
    path = Path(path)
    with Image.open(path) as img:
        tags = getattr(img, "tag_v2", None)
        if tags is None:
            return None
        tiepoint, scale = tags.get(TAG_TIEPOINT), tags.get(TAG_PIXEL_SCALE)
        matrix, keys = tags.get(TAG_TRANSFORMATION), _geokeys(tags.get(TAG_GEOKEYS))
    epsg = keys.get(KEY_PROJECTED_TYPE) or keys.get(KEY_GEOGRAPHIC_TYPE)
    epsg = epsg if epsg and epsg != USER_DEFINED else None
    shift = 0.5 if keys.get(KEY_RASTER_TYPE) == PIXEL_IS_POINT else 0.0  # raster point (I, J) is then a pixel centre
    if matrix is not None:
        if len(matrix) != 16:
            raise ValueError(f"{path}: ModelTransformationTag holds {len(matrix)} numbers, expected 16")
        m = [float(v) for v in matrix]
        return GeoReference(m[0], m[1], m[3] - shift * (m[0] + m[1]), m[4], m[5], m[7] - shift * (m[4] + m[5]), epsg, str(path))
    if tiepoint is None or scale is None:
        return None
    if len(tiepoint) < 6 or len(scale) < 2:
        raise ValueError(f"{path}: GeoTIFF tie point or pixel scale too short ({len(tiepoint)} and {len(scale)} numbers)")
    i, j, _, x, y, _ = (float(v) for v in tiepoint[:6])
    sx, sy = float(scale[0]), float(scale[1])
    if sx == 0 or sy == 0:
        raise ValueError(f"{path}: GeoTIFF pixel scale is zero")
    return GeoReference(sx, 0.0, x - (i + shift) * sx, 0.0, -sy, y + (j + shift) * sy, epsg, str(path))


def _import_rasterio():
    try:
        import rasterio
    except ImportError:
        return None
    return rasterio


def georeference(image_path) -> GeoReference | None:
    """The image's georeference: its GeoTIFF tags, else a world file beside it, else (rasterio installed) rasterio's; or None."""
    path = Path(image_path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            found = geotiff_reference(path)
        except (OSError, SyntaxError):  # Pillow cannot parse this TIFF: rasterio may
            found = None
        if found is not None:
            return found
    for candidate in world_file_candidates(path):
        if candidate.is_file():
            return read_world_file(candidate)
    rasterio = _import_rasterio()
    if rasterio is not None and path.suffix.lower() in TIFF_SUFFIXES:
        with rasterio.open(path) as dataset:
            if dataset.transform is not None and not dataset.transform.is_identity:
                t = dataset.transform
                epsg = dataset.crs.to_epsg() if dataset.crs is not None else None
                return GeoReference(t.a, t.b, t.c, t.d, t.e, t.f, epsg, str(path))
    return None


def read_with_rasterio(path, pillow_error: ValueError) -> Image.Image:
    """An image Pillow could not read (16-bit multiband GeoTIFF) via the optional rasterio, bands 1-3 stretched to 8 bits."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise pillow_error
    rasterio = _import_rasterio()
    if rasterio is None:
        raise ValueError(f"{pillow_error} (a 16-bit or multiband GeoTIFF? install the optional rasterio to read it)") from None
    with rasterio.open(path) as dataset:
        bands = dataset.read(list(range(1, min(3, dataset.count) + 1))).astype(np.float64)  # (C, H, W)
    channels = []
    for band in bands:
        low, high = np.percentile(band, (2, 98))
        channels.append(np.clip((band - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8))
    while len(channels) < 3:
        channels.append(channels[0])
    return Image.fromarray(np.stack(channels, axis=-1), mode="RGB")


def _ring(points) -> list:
    """A closed GeoJSON ring, counter-clockwise in its own coordinates (RFC 7946's right-hand rule)."""
    signed = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))
    ordered = points if signed >= 0 else points[::-1]
    return [[round(x, 9), round(y, 9)] for x, y in ordered + ordered[:1]]


def feature_collection(records, task: str, reference: GeoReference | None = None, image: str | None = None) -> dict:
    """Box records (sample.box_records' dicts: label, polygon in pixels ...) -> a GeoJSON FeatureCollection.

    Coordinates are map coordinates when reference is given, else pixels (x right, y down); the top-level
    "coordinates" member says which, and "crs" names the EPSG code when it is known.
    """
    features = []
    for record in records:
        pixels = [tuple(p) for p in record["polygon"]]
        if polygon_area(pixels) <= 0:
            continue  # a zero-area box is no polygon
        points = reference.to_map(pixels) if reference is not None else pixels
        properties = {"label": record.get("label"), "task": task}
        properties.update({k: record[k] for k in ("x1", "y1", "x2", "y2", "angle") if k in record})
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(points)]},
                         "properties": properties})
    collection = {"type": "FeatureCollection", "coordinates": "map" if reference is not None else "pixel"}
    if image is not None:
        collection["image"] = image
    if reference is not None and reference.epsg is not None:
        collection["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{reference.epsg}"}}
    collection["features"] = features
    return collection


def write_geojson(path, collection: dict):
    """Write a FeatureCollection to a new file (FileExistsError rather than overwrite one)."""
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(collection) + "\n")
