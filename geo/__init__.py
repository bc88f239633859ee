"""Remote-sensing workflows on top of GeoChat: whole-scene tiling, map coordinates, DOTA-style datasets."""
