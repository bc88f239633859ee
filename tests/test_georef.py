"""Map coordinates (geo/georef.py): world files, GeoTIFF tags written here with known numbers, GeoJSON checked by shapely."""

import json

import pytest
from PIL import Image, TiffImagePlugin

import sample
from boxes import polygon_area
from geo import georef

shapely_geometry = pytest.importorskip("shapely.geometry")

UTM_33N = 32633


def write_geotiff(path, size, tiepoint, scale, geokeys=None):
    """A TIFF with ModelTiepointTag, ModelPixelScaleTag and optionally a GeoKeyDirectoryTag."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[georef.TAG_PIXEL_SCALE], ifd.tagtype[georef.TAG_PIXEL_SCALE] = tuple(scale), 12  # DOUBLE
    ifd[georef.TAG_TIEPOINT], ifd.tagtype[georef.TAG_TIEPOINT] = tuple(tiepoint), 12
    if geokeys is not None:
        ifd[georef.TAG_GEOKEYS], ifd.tagtype[georef.TAG_GEOKEYS] = tuple(geokeys), 3  # SHORT
    Image.new("RGB", size, "green").save(path, tiffinfo=ifd)


def geokeys(raster_type, projected_epsg):
    """A GeoKeyDirectoryTag with GTRasterTypeGeoKey and ProjectedCSTypeGeoKey."""
    return (1, 1, 0, 2, georef.KEY_RASTER_TYPE, 0, 1, raster_type, georef.KEY_PROJECTED_TYPE, 0, 1, projected_epsg)


def test_world_file_maps_pixel_centres_and_corners(tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 30)).save(image)
    (tmp_path / "scene.pgw").write_text("0.5\n0.0\n0.0\n-0.5\n1000.25\n2000.25\n")  # A D B E C F: pixel (0, 0)'s centre
    reference = georef.georeference(image)
    assert reference.source.endswith("scene.pgw") and reference.epsg is None
    assert reference.to_map([(0.5, 0.5)]) == [(1000.25, 2000.25)]  # the centre of pixel (0, 0)
    assert reference.to_map([(0, 0), (40, 30)]) == [(1000.0, 2000.5), (1020.0, 1985.5)]  # outer corners


@pytest.mark.parametrize("suffix,world", [(".jpg", ".jgw"), (".tif", ".tfw"), (".png", ".wld"), (".png", ".PGW")])
def test_world_file_names(tmp_path, suffix, world):
    image = tmp_path / f"scene{suffix}"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / f"scene{world}").write_text("2 0 0 -2 10 20")
    assert georef.georeference(image).to_map([(0.5, 0.5)]) == [(10.0, 20.0)]


def test_no_georeference_is_none(tmp_path):
    image = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(image)
    assert georef.georeference(image) is None


@pytest.mark.parametrize("text,message", [("1 2 3 4 5", "expected six finite numbers, found 5"),
                                          ("1 0 0 -1 a b", "expected six numbers"),
                                          ("0 0 0 0 5 5", "zero pixel size"),
                                          ("1 0 0 -1 nan 5", "six finite numbers")])
def test_bad_world_file_is_named(tmp_path, text, message):
    image = tmp_path / "scene.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "scene.pgw").write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        georef.georeference(image)
    assert "scene.pgw" in str(error.value)


def test_geotiff_tie_point_scale_and_epsg(tmp_path):
    path = tmp_path / "scene.tif"
    write_geotiff(path, (40, 30), (0, 0, 0, 500000.0, 4000000.0, 0), (0.5, 0.25, 0), geokeys(1, UTM_33N))
    reference = georef.georeference(path)
    assert reference.epsg == UTM_33N
    assert reference.to_map([(0, 0), (40, 30), (10, 4)]) == [(500000.0, 4000000.0), (500020.0, 3999992.5), (500005.0, 3999999.0)]


def test_geotiff_tie_point_elsewhere_and_pixel_is_point(tmp_path):
    area, point = tmp_path / "area.tif", tmp_path / "point.tif"
    write_geotiff(area, (40, 30), (10, 20, 0, 300.0, 700.0, 0), (2.0, 2.0, 0))  # raster point (10, 20) at (300, 700)
    write_geotiff(point, (40, 30), (10, 20, 0, 300.0, 700.0, 0), (2.0, 2.0, 0), geokeys(georef.PIXEL_IS_POINT, UTM_33N))
    assert georef.georeference(area).to_map([(10, 20), (0, 0)]) == [(300.0, 700.0), (280.0, 740.0)]
    assert georef.georeference(point).to_map([(10.5, 20.5)]) == [(300.0, 700.0)]  # PixelIsPoint: the tie is a pixel centre


def test_geojson_polygons_in_map_coordinates_are_valid_and_right(tmp_path):
    path = tmp_path / "scene.tif"
    write_geotiff(path, (400, 200), (0, 0, 0, 500000.0, 4000000.0, 0), (0.5, 0.5, 0), geokeys(1, UTM_33N))
    records = sample.box_records("<p>two ships</p> {<10><30><50><60>|<0>}{<60><40><80><70>|<30>} {<0><0><0><0>}", 400, 200)
    collection = georef.feature_collection(records, "grounding", georef.georeference(path), image=str(path))
    assert collection["type"] == "FeatureCollection" and collection["coordinates"] == "map"
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert len(collection["features"]) == 2  # the zero-area box is no polygon
    for feature, record in zip(collection["features"], records):
        assert feature["type"] == "Feature" and feature["properties"]["label"] == "two ships"
        assert feature["properties"]["task"] == "grounding"
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        shape = shapely_geometry.shape(feature["geometry"])
        assert shape.is_valid and shape.exterior.is_ccw  # RFC 7946's right-hand rule
        assert shape.area == pytest.approx(polygon_area(record["polygon"]) * 0.25, rel=1e-6)  # 0.5 m pixels
        assert all(500000 <= x <= 500200 and 3999900 <= y <= 4000000 for x, y in ring)
    round_trip = json.loads(json.dumps(collection))
    assert round_trip == collection


def test_geojson_in_pixels_without_georeference():
    records = sample.box_records("{<10><10><20><20>|<45>}", 100, 100)
    collection = georef.feature_collection(records, "refer")
    assert collection["coordinates"] == "pixel" and "crs" not in collection
    shape = shapely_geometry.shape(collection["features"][0]["geometry"])
    assert shape.is_valid and shape.area == pytest.approx(100, rel=1e-3)


def test_write_geojson_never_overwrites(tmp_path):
    path = tmp_path / "out.geojson"
    path.write_text("mine")
    with pytest.raises(FileExistsError):
        georef.write_geojson(path, georef.feature_collection([], "grounding"))
    assert path.read_text() == "mine"


def test_unreadable_tiff_without_rasterio_says_what_to_install(tmp_path):
    if georef._import_rasterio() is not None:
        pytest.skip("rasterio is installed: it reads such files")
    path = tmp_path / "sixteen_bit.tif"
    path.write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="install the optional rasterio"):
        georef.read_with_rasterio(path, ValueError(f"{path}: truncated or corrupt image"))
    with pytest.raises(ValueError, match="not an image"):  # not a TIFF: Pillow's own error stands
        georef.read_with_rasterio(tmp_path / "x.png", ValueError("x.png: not an image"))


def test_bad_world_file_on_the_command_line_is_one_line(tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "scene.pgw").write_text("1 2 3")
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--image", str(image), "--geojson", str(tmp_path / "b.geojson"), "--checkpoint", str(tmp_path / "none")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "scene.pgw: not a world file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.geojson").exists()
