"""Extensions Catalog readiness: the description file meets the index's schema and checks, it
agrees with the top-level CMakeLists.txt, the screenshot and icon URLs name committed PNGs, and
the offscreen slice-view renderer of ``Utilities/render_screenshots.py`` blends the layers as
Slicer's slice views do (known pixel values on a synthetic scene)."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTION = ROOT / "Resources" / "Catalogue" / "SegXAI.json"
CMAKE = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")

# Facts from the schema the index's description files name in "$schema":
# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (as stored at commit
# 0e8d0c4a5b0cc0845eb2b2ce9ace43ff57df9151; draft-07, "additionalProperties": false).
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
#: property -> JSON type (every property the schema allows)
SCHEMA_TYPES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
}
SCHEMA_ENUMS = {"scm_type": ("git", "local"), "tier": (1, 3, 5)}

# Facts from Slicer/ExtensionsIndex scripts/check_description_files.py (commit
# 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c): "Segmentation" is one of ACCEPTED_EXTENSION_CATEGORIES;
# scm_url's scheme is git or https; LF-only line endings; the description file's name is the
# CMake project() name; EXTENSION_ICONURL and each of EXTENSION_SCREENSHOTURLS (one quoted,
# space-separated string) must download as an image.
INDEX_SCM_SCHEMES = ("git", "https")
#: where the raw URLs of this repository's main branch point
RAW_PREFIX = "https://raw.githubusercontent.com/SegXAI/SegXAI/main/"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cmake_variable(name: str) -> str:
    """The quoted value of ``set(<name> "...")`` in the top-level CMakeLists.txt."""
    match = re.search(rf'set\s*\(\s*{name}\s+"([^"]*)"\s*\)', CMAKE)
    assert match, f"{name} not set in CMakeLists.txt"
    return match.group(1)


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk (the first chunk, by the PNG specification)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def repository_file(url: str) -> Path:
    assert url.startswith(RAW_PREFIX), f"{url} is not a raw URL of this repository's main branch"
    return ROOT / url[len(RAW_PREFIX):]


def committed(path: Path) -> bool:
    """Whether git tracks ``path`` (a source tree without git: the file's presence)."""
    try:
        result = subprocess.run(["git", "ls-files", "--error-unmatch", str(path.relative_to(ROOT))], cwd=ROOT,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return path.is_file()
    if result.returncode != 0 and "not a git repository" in result.stderr:
        return path.is_file()
    return result.returncode == 0


@pytest.fixture(scope="module")
def description() -> dict:
    return json.loads(DESCRIPTION.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- description file


def test_description_meets_the_schema(description):
    for key in SCHEMA_REQUIRED:
        assert key in description, f"required {key!r} missing"
    assert set(description) <= set(SCHEMA_TYPES), f"not allowed by the schema: {set(description) - set(SCHEMA_TYPES)}"
    for key, value in description.items():
        # bool is an int in Python, not in JSON Schema
        assert isinstance(value, SCHEMA_TYPES[key]) and not (SCHEMA_TYPES[key] is int and isinstance(value, bool)), key
        if key in SCHEMA_ENUMS:
            assert value in SCHEMA_ENUMS[key], key
    assert all(isinstance(item, str) for item in description.get("build_dependencies", []))
    assert description["$schema"] == SCHEMA_URL


def test_description_passes_the_index_checks(description):
    assert b"\r" not in DESCRIPTION.read_bytes()
    assert description["category"] == "Segmentation"
    assert description["scm_url"].split("://")[0] in INDEX_SCM_SCHEMES
    assert description["scm_url"] == "https://github.com/SegXAI/SegXAI.git"
    assert description["scm_revision"] == "main"
    project = re.search(r"project\s*\(\s*([^\s)]+)", CMAKE).group(1)
    assert DESCRIPTION.stem == project == "SegXAI"


def test_description_agrees_with_cmake(description):
    # a CMake list: items separated by spaces or semicolons
    depends = [item for item in re.split(r"[;\s]+", cmake_variable("EXTENSION_DEPENDS")) if item]
    assert description["build_dependencies"] == depends == ["PyTorch"]
    assert description["category"] == cmake_variable("EXTENSION_CATEGORY")


def test_screenshot_urls_name_committed_small_pngs():
    urls = cmake_variable("EXTENSION_SCREENSHOTURLS").split()
    assert urls, "EXTENSION_SCREENSHOTURLS is empty"
    assert len(set(urls)) == len(urls)
    for url in urls:
        path = repository_file(url)
        assert path.suffix == ".png" and path.is_file(), url
        width, height = png_size(path)
        assert 200 <= max(width, height) <= 1200, (url, width, height)
        assert path.stat().st_size < 300 * 1024, url
        assert committed(path), f"{path} is not committed"


def test_icon_is_a_committed_128_pixel_png():
    path = repository_file(cmake_variable("EXTENSION_ICONURL"))
    assert png_size(path) == (128, 128)
    assert committed(path)


# ---------------------------------------------------------------------------- renderer


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_screenshots", ROOT / "Utilities" / "render_screenshots.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_slice_logic_blends_the_saliency_over_the_grey_background():
    """A 16 x 16 x 4 background of grey blocks (window 0..255: a value is its own grey level)
    under a saliency volume: 0.5 inside one block (above the 17 % threshold: tinted), 0.1 in
    another (below: transparent), 0 elsewhere; rendered in the Red (axial) view at 4 pixels
    per voxel. Each pixel is compared with the voxel the slice node's XY-to-RAS puts it in.

    Expected colours: the hot table at 0.5 of its range is (1, 0.5, 0); at foreground opacity
    0.5, ``out = 0.5 * grey + 0.5 * 255 * hot``. Tolerances in 8-bit levels: 1 for the
    window/level and blend roundings; 3 on green, which also carries the colour table's
    quantisation (one of 256 entries: 3 / 256 of the hot ramp's green, 0.5 * 255 * 3 / 256 = 1.5).
    """
    pytest.importorskip("slicer")
    from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
    from SegXAILib.mrml import headless_scene, image_to_volume_node
    from SegXAILib.mrml.display import saliency_volume_node, show_in_slice_views

    renderer = load_renderer()
    shape = (16, 16, 4)
    ijk_to_ras = geometry_matrix((2.0, 2.0, 3.0), (-10.0, 5.0, 20.0), np.eye(3))
    i, j, _ = np.indices(shape)
    grey = (40 + 10 * (i // 4) + 40 * (j // 8)).astype(np.float32)
    saliency = np.zeros(shape, np.float32)
    saliency[4:12, 4:12] = 0.5
    saliency[0:4, 12:16] = 0.1

    scene = headless_scene()
    background = image_to_volume_node(Image(grey[None], ijk_to_ras, ("grey",)), scene, "grey")
    display = background.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 255.0)
    display.SetInterpolate(False)
    foreground = saliency_volume_node(Image(saliency[None], ijk_to_ras, ("s",)), scene, "saliency", peak=1.0,
                                      signed=False, threshold=0.17)
    show_in_slice_views(scene, background=background, foreground=foreground, foreground_opacity=0.5)
    through = (ijk_to_ras @ [7.5, 7.5, 2.0, 1.0])[:3]
    pixels = renderer.render_slice_view(scene, "Red", (64, 64), through_ras=through)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8

    # pixel (row, column) -> slice XY (column, height - 1 - row) -> RAS -> continuous IJK
    node = renderer.slice_node(scene, "Red")
    xy_to_ras = np.array([[node.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    rows, columns = np.mgrid[0:64, 0:64]
    xy = np.stack([columns, 63 - rows, np.zeros_like(rows), np.ones_like(rows)], -1).reshape(-1, 4).astype(float)
    ijk = (np.linalg.inv(ijk_to_ras) @ xy_to_ras @ xy.T).T[:, :3]
    assert np.allclose(ijk[:, 2], 2.0, atol=1e-6), "the slice does not pass through the voxel centres of k = 2"
    # keep pixels whose voxel is unambiguous: the points 0.3 voxel around them fall in one voxel
    # of one kind (the nearest-neighbour boundary may lie anywhere within a pixel)
    corners = [np.rint(ijk + [di, dj, 0.0]).astype(int) for di in (-0.3, 0.3) for dj in (-0.3, 0.3)]
    inside = np.all([np.all((c >= 0) & (c < shape), axis=1) for c in corners], axis=0)
    kinds = {}
    for name, table in (("grey", grey), ("saliency", saliency)):
        values = np.stack([np.where(inside, table[tuple(np.clip(c, 0, np.array(shape) - 1).T)], np.nan) for c in corners])
        kinds[name] = values[0]
        inside &= np.all(values == values[0], axis=0)
    flat = pixels.reshape(-1, 3).astype(float)
    value, level = kinds["saliency"], kinds["grey"]

    tinted = inside & (value == 0.5)
    plain = inside & (value < 0.17)
    below = inside & (value == 0.1)
    assert tinted.sum() >= 400 and below.sum() >= 50 and plain.sum() >= 1000
    # below the threshold (and outside the map): exactly the grey of the background
    assert np.all(np.abs(flat[plain] - level[plain, None]) <= 1.0)
    expected = np.stack([0.5 * level + 0.5 * 255.0, 0.5 * level + 0.5 * 255.0 * 0.5, 0.5 * level], axis=1)
    assert np.all(np.abs(flat[tinted] - expected[tinted]) <= [1.0, 3.0, 1.0])
    assert np.all((flat[tinted, 0] > flat[tinted, 1]) & (flat[tinted, 1] > flat[tinted, 2]))

    with pytest.raises(SegXAIInputError, match="view 'Blue'"):
        renderer.render_slice_view(scene, "Blue")
