"""Benchmark: click-to-overlay latency of the browser viewer (``segxai view``), in a real browser.

Run from the repository root::

    python Testing/Benchmarks/bench_viewer_latency.py [--clicks 10] [--device cpu|cuda]
        [--case CASE_DIR] [--out Testing/Benchmarks/results]

Results go to ``results/viewer_latency.{json,md}`` (CPU) or ``results/viewer_latency_cuda.{json,md}``.

Setting: the quick demo's case folder (``segxai demo --quick``, made in a temporary folder unless
``--case`` gives one) opened by ``segxai view CASE --port 0 --device D``; Debian's chromium driven
by Playwright (headless, software GL, viewport 1280x800), the harness of
``Testing/viewer_browser.py``.

One click: bring a lesion onto the axial view (a click on its row of the lesion table, which
centres the views on it), wait until the view settled, turn pick-lesion mode on, click the
lesion's ``lesion_targets`` point. Clicks alternate between the lesions (the first two of the
table). Measured on the browser's clock (``performance.now()``), from the mouse-down:

* ``state``: until the page's trame state says ``instance_shown`` = that lesion with a new
  ``overlay_version`` (the server computed the instance saliency, mean and max aggregations, in
  its engine process and showed it);
* ``overlay``: until the load of the first frame of the axial view from which on the view around
  the click differs from the frame before the click (more than half of the pixels within 5 % of
  the view's side of the click changed by more than the JPEG noise, the largest difference between
  two frames of an unchanged scene), up to the settled frame. A frame that changed and then
  reverted (a transient) does not count.

The first click is reported apart (the engine warms up: model load, first forward); p50 and p95
(linear interpolation) are over the others. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (str(ROOT), str(HERE), str(ROOT / "Testing")):
    if path not in sys.path:
        sys.path.insert(0, path)

from viewer_browser import (  # noqa: E402
    changed_fraction,
    ensure_pick_mode,
    get,
    launch_browser,
    last_click_ms,
    make_demo_case,
    measure_noise,
    missing_requirements,
    open_app,
    park_mouse,
    pick_state_time_ms,
    settled_pixels,
    start_viewer,
    target_point,
    view_pixels,
    view_src,
    frame_time_ms,
    wait_idle,
    wait_state,
)

DEFAULTS = {"clicks": 10, "device": "cpu", "radius": 0.05, "viewport": [1280, 800], "lesions": 2}
#: one pick (instance saliency in the engine, both aggregations) on a loaded machine, and the frame after it
PICK_TIMEOUT_S = 300.0


def jump_to(page, lesion_id: int, timeout_s: float = 30.0) -> dict:
    """Centre the views on a lesion (its lesion-table row) and return its on-slice target."""
    page.evaluate("""id => { for (const row of document.querySelectorAll('#segxai-lesions tr')) {
        const cell = row.querySelector('td'); if (cell && cell.textContent.trim() === String(id)) { row.click(); return; } }
        throw new Error('no lesion-table row ' + id); }""", lesion_id)
    wait_state(page, "(s.get('lesion_targets') || []).some(t => t.id === arg && t.on_slice !== false)", timeout_s,
               arg=lesion_id)
    return next(t for t in get(page, "lesion_targets") if t["id"] == lesion_id)


def one_click(page, lesion_id: int, noise: int, radius: float) -> dict[str, Any]:
    target = jump_to(page, lesion_id)
    wait_idle(page, PICK_TIMEOUT_S)
    version = get(page, "overlay_version")
    ensure_pick_mode(page, True)
    park_mouse(page)
    before = settled_pixels(page)
    centre = (target["x"], target["y"])
    page.mouse.click(*target_point(page, target))
    click_ms = last_click_ms(page)
    # follow the frames until the state says shown and the view has settled; the overlay time is
    # the first frame of the last run of changed frames
    seen, candidate, shown, quiet_since = None, None, False, None
    deadline = time.monotonic() + PICK_TIMEOUT_S
    while time.monotonic() < deadline:
        src = view_src(page)
        if src != seen:
            seen, quiet_since = src, time.monotonic()
            changed = changed_fraction(before, view_pixels(page), noise, centre, radius) > 0.5
            if changed and candidate is None:
                candidate = frame_time_ms(page, src)
            elif not changed:
                candidate = None
        if not shown:
            shown = bool(page.evaluate("([id, v]) => window.trame.state.get('instance_shown') === id && "
                                       "window.trame.state.get('overlay_version') > v", [lesion_id, version]))
        if shown and candidate is not None and time.monotonic() - quiet_since > 0.5:
            break
        page.wait_for_timeout(10)
    else:
        raise TimeoutError(f"lesion {lesion_id}: no overlay within {PICK_TIMEOUT_S:.0f} s (shown={shown})")
    state_ms = pick_state_time_ms(page, lesion_id, version)
    status = str(get(page, "status"))
    engine = re.search(r"done in ([0-9.]+) s", status)  # the job's own time (engine process), as the app says
    return {"lesion": lesion_id, "state_ms": round(state_ms - click_ms, 1),
            "overlay_ms": round(candidate - click_ms, 1), "job_ms": float(engine.group(1)) * 1000 if engine else None,
            "status": status}


def benchmark(case: Path, params: dict[str, Any], log=print) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as jobs:
        server = start_viewer(case, Path(jobs), Path(jobs) / "server.log", device=params["device"])
        try:
            with sync_playwright() as playwright:
                browser = launch_browser(playwright)
                page = browser.new_page(viewport=dict(zip(("width", "height"), params["viewport"])))
                start = time.monotonic()
                open_app(page, server.url)
                open_seconds = time.monotonic() - start
                lesions = [row["id"] for row in get(page, "lesions") if row.get("id")][: params["lesions"]]
                noise = measure_noise(page)
                log(f"page ready in {open_seconds:.1f} s; lesions {lesions}; JPEG noise {noise}")
                rows = []
                for k in range(params["clicks"] + 1):  # +1: the warm-up click
                    row = one_click(page, lesions[k % len(lesions)], noise, params["radius"])
                    rows.append(row)
                    log(f"click {k}: lesion {row['lesion']} state {row['state_ms']:.0f} ms, "
                        f"overlay {row['overlay_ms']:.0f} ms")
                chromium = browser.version
                browser.close()
        finally:
            server.stop()
    timed = rows[1:]
    summary = {key: {"p50": float(np.percentile([r[key] for r in timed], 50)),
                     "p95": float(np.percentile([r[key] for r in timed], 95)),
                     "min": min(r[key] for r in timed), "max": max(r[key] for r in timed)}
               for key in ("state_ms", "overlay_ms", "job_ms") if all(r[key] is not None for r in timed)}
    return {
        "benchmark": "segxai view click-to-overlay latency",
        "device": params["device"],
        "gpu": _gpu_name(params["device"]),
        "params": params,
        "case": str(case),
        "page_ready_seconds": round(open_seconds, 2),
        "jpeg_noise": noise,
        "warmup": rows[0],
        "rows": timed,
        "summary": summary,
        "machine": _machine(chromium),
    }


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(0)


def _machine(chromium: str) -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
            "trame_slicer": version("trame-slicer"), "slicer_core": version("slicer-core"),
            "playwright": version("playwright"), "chromium": chromium}


def markdown(results: dict[str, Any]) -> str:
    p, m, s = results["params"], results["machine"], results["summary"]
    where = (f"{results['gpu']} (CUDA)" if results.get("gpu") else
             f"CPU ({m['cpus']} cores, OMP_NUM_THREADS={m['omp_num_threads'] or 'unset'})")
    lines = [
        "# Browser viewer: click-to-overlay latency",
        "",
        f"`segxai view` on the quick demo case, engine on {where}, torch {m['torch']}, trame-slicer "
        f"{m['trame_slicer']}; headless chromium {m['chromium']} (software GL, {p['viewport'][0]}x{p['viewport'][1]}) "
        f"via Playwright {m['playwright']}. {len(results['rows'])} clicks alternating between lesions "
        f"{sorted({r['lesion'] for r in results['rows']})} in pick-lesion mode, after one warm-up click. From the "
        "mouse-down, on the browser's clock: **state** = `instance_shown` and a new `overlay_version` reach "
        "the page; **overlay** = the first frame of the axial view showing the new map around the click "
        f"(over half of the pixels within {p['radius']:.0%} of the view's side changed by more than the JPEG noise, "
        f"{results['jpeg_noise']} grey levels here).",
        "",
        "| from the mouse-down | p50 (ms) | p95 (ms) | min (ms) | max (ms) | warm-up click (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("state_ms", "click → state"), ("overlay_ms", "click → overlay visible"),
                      ("job_ms", "of which the engine job (its status)")):
        if key not in s or results["warmup"][key] is None:
            continue
        lines.append(f"| {name} | {s[key]['p50']:.0f} | {s[key]['p95']:.0f} | {s[key]['min']:.0f} | "
                     f"{s[key]['max']:.0f} | {results['warmup'][key]:.0f} |")
    lines += ["", f"Page ready (state, four views, lesion targets) in {results['page_ready_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clicks", type=int, default=DEFAULTS["clicks"], help="timed clicks (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="the engine's device: cpu or cuda")
    parser.add_argument("--case", type=Path, default=None, help="a quick-demo case folder (default: make one)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        parser.error(missing)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    if args.clicks < 2:
        parser.error("--clicks must be at least 2 (p50/p95)")
    params = {**DEFAULTS, "clicks": args.clicks, "device": args.device}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        case = args.case or make_demo_case(Path(folder) / "case")
        results = benchmark(case, params, log=lambda m: print(m, flush=True))
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    from bench_attribution import write_results

    name = "viewer_latency" if args.device == "cpu" else "viewer_latency_cuda"
    json_path, md_path = write_results(results, args.out, name, markdown)
    print(markdown(results))
    print(f"wrote {json_path} and {md_path} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
