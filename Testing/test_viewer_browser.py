"""`segxai view` end to end in a real browser (Playwright driving Debian's chromium).

The quick demo's case folder is opened by the app; the tests then act like a user: pick a lesion in
the axial view (its instance map must appear on the server's state *and* in the pixels of the view),
cancel a long job, run the uncertainty, open a broken file, and talk to the server without its token;
on a server with a tiny time limit, a refused computation is asked about (the page's confirm, with
the estimate) and, accepted, runs.

Skipped only when ``playwright`` or ``chromium`` is missing. Screenshots are kept under
``Testing/artifacts/viewer/``; with ``SEGXAI_VIEWER_SCREENSHOT=1`` the one after the pick is also
copied to ``Resources/Catalogue/Screenshots/segxai_viewer.png`` (the catalogue's picture).
``SEGXAI_VIEWER_CASE=<case folder>`` reuses an existing quick-demo case instead of building one.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from viewer_browser import (
    ROOT,
    changed_fraction,
    difference,
    ensure_pick_mode,
    get,
    launch_browser,
    measure_noise,
    missing_requirements,
    open_app,
    park_mouse,
    set_state,
    settled_pixels,
    start_viewer,
    target_point,
    wait_view_change,
    wait_idle,
    wait_state,
    websocket_hello,
)

_MISSING = missing_requirements()
if _MISSING:
    pytest.skip(f"browser tests need Playwright and chromium: {_MISSING}", allow_module_level=True)

ARTIFACTS = ROOT / "Testing" / "artifacts" / "viewer"
CATALOGUE_SHOT = ROOT / "Resources" / "Catalogue" / "Screenshots" / "segxai_viewer.png"
#: a pick runs a new engine job (process start, model, instance saliency with two aggregations): about
#: 15-20 s for the quick demo on 2 busy CPU cores (Testing/Benchmarks/results/viewer_latency.md); generous
PICK_TIMEOUT_S = 120.0
#: the uncertainty step: 2 samples of intensity TTA, each one full prediction of the quick demo; generous
UNCERTAINTY_TIMEOUT_S = 240.0
#: "busy goes false within a few seconds" after Cancel
CANCEL_TIMEOUT_S = 5.0
#: the neighbourhood of the click compared before/after the pick: a disc of this fraction of the
#: view image's smaller side, inside the lesion (the quick demo's picked lesion spans about a fifth
#: of the axial view; the viewer draws lesions as outlines, so the overlay inside stays visible)
RADIUS = 0.05


@pytest.fixture(scope="session")
def demo_case(request) -> Path:
    """The quick demo's case folder: conftest's session-wide one (shared with test_viewer.py)."""
    given = os.environ.get("SEGXAI_VIEWER_CASE")
    if given:
        return Path(given)
    return request.getfixturevalue("quick_demo_case")


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def viewer(demo_case, tmp_path_factory, artifacts):
    # no time limit: the cancel test's job is deliberately long (the limit has its own test and server)
    server = start_viewer(demo_case, tmp_path_factory.mktemp("viewer_jobs"), artifacts / "server.log",
                          extra=["--max-minutes", "0"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(viewer, artifacts):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(30_000)
        open_app(page, viewer.url)
        yield page
        page.screenshot(path=str(artifacts / "final.png"))
        browser.close()


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image as PILImage

    PILImage.fromarray(array).save(path)


def _catalogue_copy(source: Path, target: Path) -> None:
    """The page screenshot as the catalogue's picture: at most 1200 pixels wide (the extension
    index's limit, test_catalogue.py), an optimised PNG, written atomically."""
    from PIL import Image as PILImage

    from SegXAILib.io import atomic_path

    image = PILImage.open(source).convert("RGB")
    if max(image.size) > 1200:
        scale = 1200 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), PILImage.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        image.save(temporary, format="PNG", optimize=True)


def _on_view_target(page) -> dict:
    """A lesion target inside the axial view whose lesion the view's plane passes through (the
    first one; ``on_slice``: a click there picks it)."""
    targets = get(page, "lesion_targets")
    inside = [t for t in targets if 0.0 < t["x"] < 1.0 and 0.0 < t["y"] < 1.0 and t.get("on_slice", True)]
    assert inside, f"no lesion target inside the axial view: {targets}"
    return inside[0]


def _pick(page, target: dict) -> float:
    """Pick mode on, click the target; returns the seconds until the server showed its instance map."""
    wait_idle(page)
    version = get(page, "overlay_version")
    ensure_pick_mode(page, True)
    x, y = target_point(page, target)
    start = time.monotonic()
    page.mouse.click(x, y)
    wait_state(page, "s.get('instance_shown') === arg.id && s.get('overlay_version') > arg.version", PICK_TIMEOUT_S,
               arg={"id": target["id"], "version": version})
    return time.monotonic() - start


def test_lesion_targets_describe_the_lesions(page):
    lesions = {lesion["id"]: lesion for lesion in get(page, "lesions")}
    targets = get(page, "lesion_targets")
    assert lesions and all(lesion["voxels"] > 0 for lesion in lesions.values())
    assert targets and {t["id"] for t in targets} <= set(lesions)
    assert get(page, "error") == ""
    assert not get(page, "busy")


def test_pick_shows_the_instance_map(page, artifacts):
    target = _on_view_target(page)
    noise = measure_noise(page)  # JPEG noise: nothing at or below it counts as a change
    ensure_pick_mode(page, True)
    park_mouse(page)
    before = settled_pixels(page)

    seconds = _pick(page, target)
    park_mouse(page)
    centre = (target["x"], target["y"])
    # the server said it is shown; its frame follows (rendered and encoded after the state change)
    first = wait_view_change(page, before, noise, centre, RADIUS, timeout_s=30.0)
    after = settled_pixels(page)
    _save_png(before, artifacts / "pick_before.png")
    _save_png(after, artifacts / "pick_after.png")
    _save_png(((difference(before, after) > noise) * 255).astype(np.uint8), artifacts / "pick_changed.png")
    page.screenshot(path=str(artifacts / "pick_page.png"))
    message = (f"the instance map of lesion {target['id']} did not appear around the click (the server said it "
               f"was shown after {seconds:.1f} s); pixels changed by more than the noise ({noise}) within "
               f"{RADIUS:.0%} of the view's side: {{:.0%}} (see {artifacts})")
    settled = changed_fraction(before, after, noise, centre, RADIUS)
    (artifacts / "pick.json").write_text(json.dumps({
        "lesion": target["id"], "target": target, "noise": noise, "state_seconds": round(seconds, 2),
        "first_changed_fraction": first["fraction"], "settled_changed_fraction": settled}, indent=2))
    assert first["frame_ms"] is not None, message.format(first["fraction"])
    assert settled > 0.5, message.format(settled)  # the final frame still shows it
    if os.environ.get("SEGXAI_VIEWER_SCREENSHOT") == "1":
        _catalogue_copy(artifacts / "pick_page.png", CATALOGUE_SHOT)


def test_cancel_stops_a_long_job_and_the_app_keeps_working(page):
    wait_idle(page)
    set_state(page, method="smoothgrad", method_params={"n_samples": 100000})
    page.click("#segxai-explain")
    wait_state(page, "s.get('busy')", 30.0)
    page.wait_for_timeout(500)  # let the job reach the engine process (its model forward)
    assert get(page, "busy"), f"the long job finished before it could be cancelled: {get(page, 'status')!r}"
    start = time.monotonic()
    page.click("#segxai-cancel")
    wait_state(page, "!s.get('busy')", CANCEL_TIMEOUT_S + 5.0)
    seconds = time.monotonic() - start
    assert seconds < CANCEL_TIMEOUT_S, f"busy went false {seconds:.1f} s after Cancel"
    assert "cancel" in get(page, "status").lower()
    assert get(page, "error") == "" or "cancel" in get(page, "error").lower()
    # the app still works: a pick shows an instance map again
    _pick(page, _on_view_target(page))


def test_uncertainty_shows_its_summary(page):
    wait_idle(page)
    set_state(page, uncertainty_source="tta", uncertainty_samples=2, uncertainty_seed=0)
    page.click("#segxai-uncertainty")
    wait_state(page, "s.get('uncertainty_shown') && !s.get('busy')", UNCERTAINTY_TIMEOUT_S)
    assert get(page, "error") == ""
    summary = get(page, "uncertainty_summary")
    assert summary["samples"] == 2 and 0.0 <= summary["mean_entropy"] <= np.log(2) + 1e-3  # 2 classes: <= log 2
    page.wait_for_selector("#segxai-uncertainty-summary:has-text('mean entropy')", timeout=10_000)
    assert summary["text"] in page.inner_text("#segxai-uncertainty-summary")
    assert all("uncertainty_mean_entropy" in row for row in get(page, "lesions"))


def test_a_bad_file_gets_a_clear_error_and_the_app_keeps_working(page, demo_case, tmp_path):
    truncated = tmp_path / "truncated_scan.nrrd"  # a valid header promising more data than there is
    truncated.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 64 64 64\n"
                          b"space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\n"
                          b"endian: little\n\n" + bytes(100))  # 25 of 262144 floats
    garbage = tmp_path / "garbage_scan.nrrd"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for bad in (truncated, garbage):
        wait_idle(page)
        set_state(page, error="", open_path=str(bad))
        page.click("#segxai-open")
        wait_state(page, "s.get('error')", 60.0)
        message = get(page, "error")
        assert bad.name in message, message
        wait_idle(page)
    # the app keeps working: the case folder opens again (shown at once, no engine job) with its
    # overlay and lesion targets, and the error is gone
    version = get(page, "overlay_version")
    set_state(page, open_path=str(demo_case))
    page.click("#segxai-open")
    wait_state(page, "s.get('overlay_version') > arg && (s.get('lesion_targets') || []).length > 0", 60.0,
               arg=version)
    assert get(page, "error") == ""


def test_a_refused_long_computation_is_asked_in_the_page_and_runs_when_accepted(page, demo_case, tmp_path,
                                                                               artifacts):
    server = start_viewer(demo_case, tmp_path / "jobs", artifacts / "server_limited.log",
                          extra=["--max-minutes", "0.00001"])  # 0.6 ms: any computation is over it
    # a second page of the module's browser (one Playwright per process), on the limited server
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        limited = context.new_page()
        limited.set_default_timeout(30_000)
        asked = []

        def accept(dialog) -> None:
            asked.append((dialog.type, dialog.message))
            dialog.accept()

        limited.on("dialog", accept)
        open_app(limited, server.url)
        wait_idle(limited)
        set_state(limited, method="smoothgrad", method_params={"n_samples": 2})
        limited.click("#segxai-explain")
        wait_state(limited, "(s.get('status') || '').startsWith('explain: done')", PICK_TIMEOUT_S)
        assert get(limited, "error") == ""
    finally:
        context.close()
        server.stop()
    assert len(asked) == 1, asked  # asked once: the confirmed run is not asked again
    kind, message = asked[0]
    assert kind == "confirm" and message.startswith("smoothgrad: 2 sample(s)"), message
    assert "over the time limit of 0.0006 s" in message and "Run it anyway" in message


def test_requests_without_the_token_are_refused(viewer):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(viewer.base + "index.html", timeout=10)
    assert refused.value.code == 403
    with urllib.request.urlopen(viewer.url, timeout=10) as allowed:  # the oracle: the token opens it
        assert allowed.status == 200
    # the websocket: without the cookie the upgrade is refused; with the cookie but a wrong secret
    # wslink's hello fails; the right secret is accepted (so the refusals are not a broken client)
    assert websocket_hello(viewer.base, "wrong-secret", cookie_secret=None)["handshake"] in (401, 403)
    wrong = websocket_hello(viewer.base, "wrong-secret", cookie_secret=viewer.token)
    assert wrong["handshake"] in (401, 403) or "error" in (wrong["reply"] or {}), wrong
    right = websocket_hello(viewer.base, viewer.token, cookie_secret=viewer.token)
    assert right["handshake"] == 101 and "result" in right["reply"], right


def test_sigterm_stops_the_server(viewer):
    assert viewer.process.poll() is None
    assert viewer.stop(timeout=15.0) is not None, "the viewer did not stop within 15 s of SIGTERM"
