"""The browser viewer without a browser: its access token on real HTTP requests, the method
form's values, where lesions are in a slice view, and the app's actions on a real trame-slicer
scene (open a saved case, bad files, display changes). The browser end to end is
``test_viewer_browser.py``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import grid_matrix
from SegXAILib.image import Image, SegXAIInputError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- the token


def test_requests_without_the_token_are_refused():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from SegXAILib.viewer.security import COOKIE, new_token, token_middleware

    token = new_token()
    assert len(token) >= 32 and token != new_token()

    async def scenario():
        app = web.Application(middlewares=[token_middleware(token)])
        async def page(request):
            return web.Response(text="page")

        app.router.add_get("/index.html", page)
        app.router.add_get("/asset.js", page)
        async with TestClient(TestServer(app)) as client:
            refused = [await client.get(path) for path in ("/index.html", "/asset.js", "/index.html?secret=wrong",
                                                              f"/index.html?secret={token[:-1]}")]
            assert [r.status for r in refused] == [403, 403, 403, 403]
            assert "access token" in await refused[0].text()
            first = await client.get(f"/index.html?secret={token}", allow_redirects=False)
            assert first.status == 200 and await first.text() == "page"
            assert first.cookies[COOKIE].value == token and first.cookies[COOKIE]["httponly"]
            # the page's assets come with the cookie alone; a reload is sent back with the secret
            asset = await client.get("/asset.js")
            assert asset.status == 200
            reload = await client.get("/index.html", allow_redirects=False)
            assert reload.status == 302 and reload.headers["Location"] == f"/index.html?secret={token}"
        async with TestClient(TestServer(app)) as stranger:  # another client: no cookie
            assert (await stranger.get("/asset.js")).status == 403

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- pure functions


def test_method_form_values_take_their_parameters_kinds():
    from SegXAILib.attribution import check_params, method_specs
    from SegXAILib.viewer.app import parameter_values

    spec = next(s for s in method_specs() if s["name"] == "smoothgrad")
    values = parameter_values(spec, {"n_samples": "12", "noise_level": "0.25", "squared": "true", "seed": "",
                                     "batch_size": 3.0})
    assert values == {"n_samples": 12, "noise_level": 0.25, "squared": True, "batch_size": 3}
    assert check_params("smoothgrad", values) == values
    with pytest.raises(SegXAIInputError, match="'n_samples': expected int"):
        parameter_values(spec, {"n_samples": "2.5"})
    with pytest.raises(SegXAIInputError, match="'noise_level': expected float"):
        parameter_values(spec, {"noise_level": "lots"})


def test_lesion_targets_are_where_a_click_picks_the_lesion():
    """The oracle: ``instance_at`` (the pick's own lookup) at the RAS point under each reported
    target, on an oblique grid seen through an axial plane through lesion 1."""
    from types import SimpleNamespace

    from SegXAILib.instances import find_instances, instance_at
    from SegXAILib.viewer.app import lesion_targets

    labels = np.zeros((20, 18, 12), np.int32)
    labels[3:8, 4:9, 2:6] = 1
    labels[13:17, 10:15, 7:10] = 1
    image = Image(labels[None].astype(np.float32), grid_matrix("oblique"))
    ids, instances = find_instances(labels.astype(bool), grid=image)
    instance_labels = image.with_array(ids[None].astype(np.int32))
    case = SimpleNamespace(instance_labels=instance_labels, instances=instances)
    # an axial view (XY pixels of 0.5 mm) through lesion 1's centroid, 200 x 160 pixels
    centre = instances[0].centroid_ras
    xy_to_ras = np.array([[0.5, 0, 0, centre[0] - 50.0], [0, 0.5, 0, centre[1] - 40.0], [0, 0, 1, centre[2]],
                          [0, 0, 0, 1]])
    targets = {t["id"]: t for t in lesion_targets(case, xy_to_ras, (200, 160))}
    assert targets[1]["on_slice"] and targets[1]["x"] == pytest.approx(0.5) and targets[1]["y"] == pytest.approx(0.5)
    for target in targets.values():
        x, y = target["x"] * 200, (1.0 - target["y"]) * 160
        ras = (xy_to_ras @ np.array([x, y, 0.0, 1.0]))[:3]
        hit = instance_at(instance_labels, instance_labels, ras, radius_mm=0.0) if target["on_slice"] else None
        assert not target["on_slice"] or hit == target["id"]
    assert lesion_targets(None, xy_to_ras, (200, 160)) == []


# ---------------------------------------------------------------------------- the app, in process


@pytest.fixture(scope="module")
def viewer(quick_demo_case, tmp_path_factory):
    pytest.importorskip("trame_slicer")
    from SegXAILib.viewer.app import ViewerApp

    app = ViewerApp(tmp_path_factory.mktemp("viewer-jobs"), device="cpu", name="segxai-test-viewer")
    return app


def test_a_saved_case_opens_at_once_and_bad_files_leave_the_app_working(viewer, quick_demo_case, tmp_path):
    from SegXAILib.mrml import slice_composite_nodes, volume_node_to_image
    from SegXAILib.pipeline import read_case

    state = viewer.state
    expected = read_case(quick_demo_case)
    viewer.open(quick_demo_case)
    assert viewer.session.job is None  # nothing recomputed
    assert [row["id"] for row in state.lesions] == [row["id"] for row in expected.lesions]
    assert [row["voxels"] for row in state.lesions] == [row["voxels"] for row in expected.lesions]
    assert state.has_case and state.qa_band == expected.qa.band and state.qa_figure.startswith("data:image/png")
    first_map = next(iter(expected.maps))
    shown = viewer.session.nodes.saliency[first_map][0]
    assert all(c.GetForegroundVolumeID() == shown.GetID() for c in slice_composite_nodes(viewer.scene))
    version = state.overlay_version
    # the display changes re-show the map from the case (signed: the raw values)
    state.display = "signed"
    viewer._on_display()
    shown = viewer.session.nodes.saliency[first_map][0]
    assert np.array_equal(volume_node_to_image(shown).array[0], expected.maps[first_map].maps.array[0])
    assert state.overlay_version == version + 1
    viewer.jump_to_lesion(2)
    red = viewer.scene.GetSingletonNode("Red", "vtkMRMLSliceNode").GetSliceToRAS()
    assert np.allclose([red.GetElement(r, 3) for r in range(3)], expected.instances[1].centroid_ras)
    assert any(t["id"] == 2 and t["on_slice"] for t in state.lesion_targets)

    # a garbage image, a missing path, a bad parameter: clear errors, the app goes on
    garbage = tmp_path / "scan.nrrd"
    garbage.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n\x00\x01")
    state.open_path = str(garbage)
    viewer.ctrl.open()
    assert "scan.nrrd" in state.error
    state.open_path = str(tmp_path / "missing")
    viewer.ctrl.open()
    assert "missing" in state.error and "does not exist" in state.error
    state.method, state.method_params = "smoothgrad", {"n_samples": "many"}
    viewer.ctrl.explain()
    assert "n_samples" in state.error and not state.busy
    state.open_path = str(quick_demo_case)
    viewer.ctrl.open()
    assert state.error == "" and state.has_case


def test_segxai_view_refuses_bad_arguments(tmp_path):
    command = [sys.executable, "-c", "from SegXAILib.cli import main; raise SystemExit(main())", "view"]
    missing = subprocess.run(command + [str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
    assert missing.returncode == 2 and "nothing" in missing.stderr and "no such" in missing.stderr
    port = subprocess.run(command + ["--port", "70000"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert port.returncode == 2 and "--port" in port.stderr
