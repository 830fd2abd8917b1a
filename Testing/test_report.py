"""Tests of SegXAILib.report: plane extraction, overlay figures and the HTML report builder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SegXAILib.image import Image, SegXAIInputError, geometry_matrix
from SegXAILib.report import HtmlReport, overlay_figure, plane_slices, saliency_rgba, save_figure
from SegXAILib.report.html import format_value

# ---- a synthetic scene stored on several grids ------------------------------------------------
# Voxel centres: R in -10..4 (step 2), A in -20..-8 (step 1.5), S in -30..-12 (step 3)
SPACING_RAS = np.array([2.0, 1.5, 3.0])
R_VALUES = np.arange(8) * 2.0 - 10
A_VALUES = np.arange(9) * 1.5 - 20
S_VALUES = np.arange(7) * 3.0 - 30
MARKER = np.array([-4.0, -14.0, -21.0])  # a voxel centre, off the middle of every axis
MARKER_VALUE = 1.0e6


def _content(ras: np.ndarray) -> np.ndarray:
    """Asymmetric along each axis, so any flip or swap changes the picture."""
    return ras[:, 0] + 10 * ras[:, 1] + 100 * ras[:, 2]


def _grids() -> dict[str, np.ndarray]:
    """The same voxel centres as four grids: (ijk_to_ras, shape)."""
    r_max, a_max, s_max = R_VALUES.max(), A_VALUES.max(), S_VALUES.max()
    r_min, a_min, s_min = R_VALUES.min(), A_VALUES.min(), S_VALUES.min()
    R, A, S = np.eye(3)
    return {
        # i -> R, j -> A, k -> S
        "ras": (geometry_matrix(SPACING_RAS, (r_min, a_min, s_min), np.column_stack([R, A, S])), (8, 9, 7)),
        # LPS (DICOM-like axial): i -> L, j -> P, k -> S
        "lps": (geometry_matrix((2.0, 1.5, 3.0), (r_max, a_max, s_min), np.column_stack([-R, -A, S])), (8, 9, 7)),
        # coronal acquisition like the bundled T1: i -> L, j -> I, k -> A
        "coronal": (geometry_matrix((2.0, 3.0, 1.5), (r_max, a_min, s_max), np.column_stack([-R, -S, A])), (8, 7, 9)),
        # sagittal, permuted and flipped: i -> P, j -> I, k -> R
        "sagittal": (geometry_matrix((1.5, 3.0, 2.0), (r_min, a_max, s_max), np.column_stack([-A, -S, R])), (9, 7, 8)),
    }


def _scene(name: str, marker: bool = True) -> Image:
    matrix, shape = _grids()[name]
    grid = Image(np.zeros(shape, np.float32), matrix)
    indices = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)
    ras = grid.ijk_to_ras_points(indices)
    values = _content(ras)
    if marker:
        values[np.all(np.isclose(ras, MARKER), axis=1)] = MARKER_VALUE
    return grid.with_array(values.reshape(shape).astype(np.float64))


@pytest.mark.parametrize("name", ["ras", "lps", "coronal", "sagittal"])
def test_grids_hold_the_same_voxel_centres(name):
    matrix, shape = _grids()[name]
    image = Image(np.zeros(shape), matrix)
    indices = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1).reshape(-1, 3)
    centres = {tuple(np.round(p, 6)) for p in image.ijk_to_ras_points(indices)}
    expected = {(r, a, s) for r in R_VALUES for a in A_VALUES for s in S_VALUES}
    assert centres == expected


@pytest.mark.parametrize("name", ["ras", "lps", "coronal", "sagittal"])
def test_marker_is_at_the_crossing_of_every_plane(name):
    views = plane_slices(_scene(name), MARKER)
    assert set(views) == {"axial", "coronal", "sagittal"}
    for plane, view in views.items():
        row, column = views.crossing[plane]
        assert view[row, column] == MARKER_VALUE, plane
        assert np.count_nonzero(view == MARKER_VALUE) == 1, plane


@pytest.mark.parametrize("name", ["lps", "coronal", "sagittal"])
def test_display_is_the_same_whatever_the_acquisition_orientation(name):
    reference = plane_slices(_scene("ras"), MARKER)
    other = plane_slices(_scene(name), MARKER)
    for plane in reference:
        np.testing.assert_array_equal(other[plane], reference[plane])
        assert other.crossing[plane] == reference.crossing[plane]
        assert other.aspect[plane] == pytest.approx(reference.aspect[plane])


@pytest.mark.parametrize("name", ["ras", "coronal"])
def test_display_follows_slicer_radiological_convention(name):
    views = plane_slices(_scene(name, marker=False), MARKER)
    step_r, step_a, step_s = SPACING_RAS * [1, 10, 100]  # content change per voxel along R, A, S
    # (moving one pixel right on screen, moving one pixel down on screen)
    expected = {
        "axial": (-step_r, -step_a),  # right on screen = patient left; down = posterior
        "coronal": (-step_r, -step_s),  # right on screen = patient left; down = inferior
        "sagittal": (-step_a, -step_s),  # right on screen = posterior; down = inferior
    }
    for plane, (rightwards, downwards) in expected.items():
        view = views[plane]
        np.testing.assert_allclose(np.diff(view, axis=1), rightwards, err_msg=plane)
        np.testing.assert_allclose(np.diff(view, axis=0), downwards, err_msg=plane)
        row, column = views.crossing[plane]
        assert view[row, column] == pytest.approx(_content(MARKER[None])[0])
    # plane shapes: (rows, columns) in voxels along the displayed axes
    assert views["axial"].shape == (len(A_VALUES), len(R_VALUES))
    assert views["coronal"].shape == (len(S_VALUES), len(R_VALUES))
    assert views["sagittal"].shape == (len(S_VALUES), len(A_VALUES))


def test_aspect_ratios_follow_the_spacing():
    views = plane_slices(_scene("coronal"), MARKER)
    sr, sa, ss = SPACING_RAS
    assert views.aspect == pytest.approx({"axial": sa / sr, "coronal": ss / sr, "sagittal": ss / sa})
    assert views.spacing["axial"] == pytest.approx((sa, sr))


def test_sample_t1_planes_and_aspect(sample_head):
    t1 = sample_head.t1  # coronal acquisition, 2 x 2 x 3 mm
    centre = t1.ijk_to_ras_points(np.array(t1.spatial_shape) / 2)[0]
    views = plane_slices(t1, centre)
    # RAS-reoriented grid is (128 R, 62 A, 128 S) at (2, 3, 2) mm
    assert views["axial"].shape == (62, 128)
    assert views["coronal"].shape == (128, 128)
    assert views["sagittal"].shape == (128, 62)
    assert views.aspect == pytest.approx({"axial": 1.5, "coronal": 1.0, "sagittal": 2 / 3})


def test_point_outside_the_image_is_refused():
    with pytest.raises(SegXAIInputError, match="outside"):
        plane_slices(_scene("ras"), (500.0, 0.0, 0.0))
    with pytest.raises(SegXAIInputError):
        plane_slices(_scene("ras"), (1.0, 2.0))


# ---- overlay figures --------------------------------------------------------------------------
def _render(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def _panel_pixels(fig, rgba: np.ndarray) -> list[np.ndarray]:
    height = rgba.shape[0]
    crops = []
    for ax in fig.axes[:3]:
        box = ax.get_window_extent()
        x0, x1 = int(np.ceil(box.x0)) + 1, int(np.floor(box.x1)) - 1
        y0, y1 = height - int(np.floor(box.y1)) + 1, height - int(np.ceil(box.y0)) - 1
        crops.append(rgba[y0:y1, x0:x1])
    return crops


def _labels_for(image: Image) -> Image:
    ras = image.ijk_to_ras_points(
        np.stack(np.meshgrid(*(np.arange(s) for s in image.spatial_shape), indexing="ij"), -1).reshape(-1, 3)
    )
    inside = np.linalg.norm((ras - MARKER) / [4.0, 3.0, 6.0], axis=1) <= 1
    labels = np.where(inside, 2, 0) + (ras[:, 0] > 1)  # a blob (2) and a slab (1), overlapping as 3
    return image.with_array(labels.reshape(image.spatial_shape).astype(np.uint8))


def test_saliency_rgba_is_transparent_below_threshold_and_keeps_the_sign():
    values = np.array([[-1.0, -0.5, -0.1, 0.0], [0.1, 0.16, 0.17, 1.0]])
    rgba = saliency_rgba(values, vmax=1.0, threshold=0.17, signed=True, alpha=0.6)
    hidden = np.abs(values) < 0.17
    assert np.all(rgba[hidden][:, 3] == 0)
    assert np.all(rgba[~hidden][:, 3] == pytest.approx(0.6))
    blue_minus_red = rgba[..., 2] - rgba[..., 0]
    assert blue_minus_red[0, 0] > 0.2 and blue_minus_red[1, 3] < -0.2  # -1 blue, +1 red
    magnitude = saliency_rgba(values, vmax=1.0, threshold=0.17, signed=False)
    np.testing.assert_allclose(magnitude[0, 0], magnitude[1, 3])  # the sign is dropped


def test_overlay_leaves_background_untouched_where_saliency_is_below_threshold():
    background = _scene("coronal", marker=False)
    labels = _labels_for(background)
    rng = np.random.default_rng(0)
    saliency_values = rng.uniform(-0.16, 0.16, background.spatial_shape)
    # the only strong voxel lies on none of the three planes through the marker
    far = background.ras_to_ijk_points([[R_VALUES[0], A_VALUES[0], S_VALUES[0]]])[0].round().astype(int)
    saliency_values[tuple(far)] = 1.0
    saliency = background.with_array(saliency_values)

    plain = overlay_figure(background, MARKER, labels=labels, title="plain")
    hidden = overlay_figure(background, MARKER, labels=labels, saliency=saliency, signed=True, title="plain")
    for without, with_ in zip(_panel_pixels(plain, _render(plain)), _panel_pixels(hidden, _render(hidden))):
        assert without.size > 1000
        np.testing.assert_array_equal(with_, without)

    # the same in-plane values do show once the map's maximum is lower (0.16 > 0.17 * 0.5)
    saliency_values[tuple(far)] = 0.5
    shown = overlay_figure(background, MARKER, labels=labels, saliency=background.with_array(saliency_values), title="plain")
    changed = [
        np.any(a != b) for a, b in zip(_panel_pixels(plain, _render(plain)), _panel_pixels(shown, _render(shown)))
    ]
    assert all(changed)


def test_overlay_is_identical_for_any_acquisition_orientation():
    figures = []
    for name in ("ras", "sagittal"):
        background = _scene(name, marker=False)
        saliency = background.with_array(np.sin(background.array / 50.0))
        fig = overlay_figure(background, MARKER, labels=_labels_for(background), saliency=saliency, crosshair=True)
        figures.append(_render(fig))
    np.testing.assert_array_equal(figures[0], figures[1])


def test_overlay_panels_have_physical_proportions(sample_head):
    t1 = sample_head.t1
    centre = t1.ijk_to_ras_points(np.array(t1.spatial_shape) / 2)[0]
    fig = overlay_figure(t1, centre, labels=sample_head.brain, title="T1")
    _render(fig)
    # RAS extents in mm: R 128*2, A 62*3, S 128*2
    expected = {"axial": (256, 186), "coronal": (256, 256), "sagittal": (186, 256)}  # (width, height)
    for ax, (plane, (width, height)) in zip(fig.axes[:3], expected.items()):
        assert ax.get_title() == plane.capitalize()
        box = ax.get_window_extent()
        assert box.width / box.height == pytest.approx(width / height, rel=0.02), plane


def test_a_given_grey_window_replaces_the_backgrounds_percentiles():
    """Counterfactual figures share one grey scale: the window given is every panel's, the
    default the background's 1st-99th percentile."""
    background = _scene("ras", marker=False)
    default = tuple(np.percentile(background.array[0], [1, 99]))
    for window, expected in ((None, default), ((-5000.0, 5000.0), (-5000.0, 5000.0))):
        fig = overlay_figure(background, MARKER, window=window)
        for ax in fig.axes[:3]:
            assert ax.images[0].get_clim() == pytest.approx(expected)
    for bad in ((1.0, 1.0), (2.0, 1.0), (0.0, float("nan"))):
        with pytest.raises(SegXAIInputError, match="window"):
            overlay_figure(background, MARKER, window=bad)


def test_grid_mismatch_is_refused():
    background = _scene("ras")
    other_grid = _scene("coronal")
    with pytest.raises(SegXAIInputError, match="labels.*grid"):
        overlay_figure(background, MARKER, labels=_labels_for(other_grid))
    shifted = Image(background.array, background.ijk_to_ras + np.pad(np.eye(3, 4, 3), ((0, 1), (0, 0))))
    with pytest.raises(SegXAIInputError, match="saliency.*grid"):
        overlay_figure(background, MARKER, saliency=shifted)


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig = overlay_figure(_scene("ras"), MARKER, crosshair=True)
    path = save_figure(fig, tmp_path / "out" / "view.png")
    assert path == tmp_path / "out" / "view.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["view.png"]
    with pytest.raises(SegXAIInputError):
        save_figure(fig, tmp_path / "view.jpg")


def test_figures_do_not_use_pyplot():
    code = (
        "import sys, numpy as np\n"
        "from SegXAILib.image import Image\n"
        "from SegXAILib.report import overlay_figure\n"
        "img = Image(np.random.rand(6, 6, 6))\n"
        "fig = overlay_figure(img, (2, 2, 2), labels=img.with_array((img.array > 0.5).astype('u1')),"
        " saliency=img)\n"
        "fig.canvas.draw()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- HTML report ------------------------------------------------------------------------------
def test_report_escapes_user_text_and_links_existing_files(tmp_path):
    evil = '<script>alert("x")</script>'
    report = HtmlReport(f"Case {evil}", tmp_path / "report")
    report.add_heading(evil)
    report.add_paragraph(f"first {evil}\n\nsecond & more")
    report.add_table(
        [{"lesion": 1, "volume_ml": 0.123456789, "note": evil}, {"lesion": 2, "volume_ml": 123456.789, evil: 3}],
        caption=evil,
    )
    report.add_key_values({"model": evil, "dice": 0.876543}, caption=evil)
    fig_path = report.add_figure(overlay_figure(_scene("ras"), MARKER), caption=evil, name="../views <1>")
    png = save_figure(overlay_figure(_scene("lps"), MARKER), tmp_path / "elsewhere.png")
    copied = report.add_figure(png, caption="copied")
    again = report.add_figure(overlay_figure(_scene("ras"), MARKER), name="../views <1>")
    path = report.write()

    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report" / "report.html"
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    assert "second &amp; more" in text
    assert "0.1235" in text and "1.235e+05" in text and "0.8765" in text
    assert "http://" not in text and "https://" not in text and "//" not in re.sub(r"<!DOCTYPE html>", "", text)
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 3
    for source in sources:
        assert not source.startswith("/") and ".." not in source
        assert (path.parent / source).is_file(), source
    assert fig_path.parent == copied.parent == again.parent == tmp_path / "report" / "figures"
    assert len({fig_path, copied, again}) == 3
    # no temporary files left behind, nothing written outside the report folder
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(
        ["elsewhere.png", "report/report.html"] + [f"report/figures/{p.name}" for p in (fig_path, copied, again)]
    )


def test_report_write_is_atomic_and_repeatable(tmp_path):
    report = HtmlReport("QA", tmp_path, timestamp=False)
    report.add_paragraph("one")
    first = report.write("qa.html").read_text(encoding="utf-8")
    report.add_paragraph("two")
    second = report.write("qa.html").read_text(encoding="utf-8")
    assert "one" in first and "two" not in first and "two" in second
    assert [p.name for p in tmp_path.iterdir()] == ["qa.html"]
    assert (tmp_path / "qa.html").stat().st_mode & 0o044  # readable beyond the owner (umask 022)
    with pytest.raises(SegXAIInputError):
        report.write("../escape.html")
    with pytest.raises(SegXAIInputError):
        report.add_figure(tmp_path / "qa.html")  # not a PNG


def test_format_value():
    assert format_value(0.123456789) == "0.1235"
    assert format_value(np.float32(2.5)) == "2.5"
    assert format_value(np.int64(7)) == "7"
    assert format_value(float("nan")) == "n/a"
    assert format_value(None) == ""
    assert format_value(True) == "yes"
    assert format_value((1.0, 2.25)) == "1, 2.25"


@pytest.fixture(scope="module")
def sample_head():
    from SegXAILib.sample_data import load_sample_head

    return load_sample_head()


def test_table_image_cells_are_thumbnails_of_existing_files(tmp_path):
    from matplotlib.figure import Figure

    report = HtmlReport("thumbnails <&>", tmp_path)
    figure = Figure(figsize=(1, 1))
    figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    cell = report.image_cell(figure, alt="lesion <1>", name="thumb")
    report.add_table([{"id": 1, "view": cell}, {"id": 2, "view": None}], caption="Lesions")
    html = report.write().read_text(encoding="utf-8")
    sources = re.findall(r'<img class="thumb" src="([^"]+)" alt="([^"]+)"', html)
    assert sources == [("figures/thumb.png", "lesion &lt;1&gt;")]
    assert (tmp_path / sources[0][0]).read_bytes()[:4] == b"\x89PNG"
    assert "<figure>" not in html  # an image cell does not add a figure to the page
