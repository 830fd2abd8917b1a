"""Browser harness of the `segxai view` app: start the server, drive it with Playwright and Debian's
chromium, read the trame state, click in the axial view, compare screenshots of the view.

Shared by ``Testing/test_viewer_browser.py`` (end-to-end tests) and
``Testing/Benchmarks/bench_viewer_latency.py`` (click-to-overlay latency). Only the app's contract is
used: the URL line on stdout, the trame state keys, the element ids ``segxai-*``.
"""

from __future__ import annotations

import asyncio
import io
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: what the app prints once it serves (the contract's only stdout line we rely on)
URL_PREFIX = "SegXAI viewer: "
#: chromium flags: no sandbox (containers, root), software GL, /tmp instead of a small /dev/shm
CHROMIUM_ARGS = ["--no-sandbox", "--use-gl=swiftshader", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """The system chromium (Debian's package) Playwright drives through ``executable_path``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the test extra has it)"
    if chromium_path() is None:
        return "chromium is not installed (apt-get install chromium; `make install` does it)"
    return None


def view_command() -> list[str]:
    """The command that starts the app, up to and including the ``view`` subcommand.

    ``SEGXAI_VIEWER_COMMAND`` (a shell-quoted prefix) replaces it, to run the harness against a
    stand-in server that takes the same arguments.
    """
    override = os.environ.get("SEGXAI_VIEWER_COMMAND")
    if override:
        return shlex.split(override)
    return [sys.executable, "-c", "from SegXAILib.cli import main; raise SystemExit(main())", "view"]


def make_demo_case(out: Path) -> Path:
    """``segxai demo --quick`` into ``out`` (a case folder with case.json); reused when there."""
    if (out / "case.json").is_file():
        return out
    from SegXAILib.cli import main

    if main(["-q", "demo", "--quick", "--out", str(out), "--device", "cpu"]) != 0:
        raise RuntimeError(f"segxai demo --quick --out {out} failed")
    return out


@dataclass
class ViewerServer:
    """A running ``segxai view`` process and its tokenised URL."""

    process: subprocess.Popen
    url: str
    log: Path
    lines: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        """``http://127.0.0.1:<port>/`` (no token)."""
        return self.url.split("index.html")[0].split("?")[0]

    @property
    def token(self) -> str:
        return self.url.split("secret=", 1)[1].split("&")[0]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait; returns the exit code (``None`` if it had to be killed)."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None


def start_viewer(case_dir: Path, jobs_dir: Path, log: Path, device: str = "cpu", timeout: float = 180.0,
                 extra: list[str] | None = None) -> ViewerServer:
    """Start the app on a free port and wait for its URL line (stdout; stderr goes to ``log``)."""
    command = view_command() + [str(case_dir), "--port", "0", "--out", str(jobs_dir), "--device", device, *(extra or [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    stderr = log.open("w", encoding="utf-8")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=str(ROOT))
    stderr.close()
    lines: "queue.Queue[str | None]" = queue.Queue()
    seen: list[str] = []

    def pump():  # a thread: readline() on a pipe cannot time out, and the pipe must keep draining
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            process.kill()
            raise TimeoutError(f"no '{URL_PREFIX}' line within {timeout:.0f} s; stdout {seen[-20:]}; "
                               f"stderr in {log}") from None
        if line is None:
            process.wait(10)
            raise RuntimeError(f"the viewer exited ({process.returncode}) before serving; stdout {seen[-20:]}; "
                               f"stderr: {log.read_text(encoding='utf-8')[-3000:]}")
        seen.append(line.rstrip())
        if line.startswith(URL_PREFIX):
            return ViewerServer(process, line[len(URL_PREFIX):].strip(), log, seen)


def launch_browser(playwright):
    """Headless chromium with software GL (no GPU needed in the browser: the views come as images)."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)


# --- page helpers --------------------------------------------------------------------------------

VIEW_IMG = "#segxai-view-red img"


def get(page, key: str) -> Any:
    """A trame state value as the browser sees it."""
    return page.evaluate("k => window.trame.state.get(k)", key)


def set_state(page, **values: Any) -> None:
    """Set state keys from the browser; returns once the client pushed them to the server
    (trame's ``state.update`` awaits its flush), so a click that follows sees them."""
    page.evaluate("async (values) => { await window.trame.state.update(values); }", values)


def wait_state(page, expression: str, timeout_s: float, arg: Any = None) -> None:
    """Wait until a JS predicate of ``s`` (``window.trame.state``) and ``arg`` holds."""
    page.wait_for_function(f"(arg) => {{ const s = window.trame.state; return !!({expression}); }}", arg=arg,
                           timeout=timeout_s * 1000, polling=25)


#: in the page: the load time (``performance.now()``) of each frame of the axial view (its ``src``
#: is a new blob URL per frame), the time of each mouse-down, and the times the state keys of a
#: pick changed; so latencies are measured on the browser's clock, not after a Python round trip
_RECORDER_JS = """() => {
  if (window.__segxai) return;
  const rec = window.__segxai = {frames: [], clicks: [], picks: []};
  const hook = () => {
    const img = document.querySelector('#segxai-view-red img');
    if (!img || img.__segxaiHooked) return;
    img.__segxaiHooked = true;
    img.addEventListener('load', () => {
      rec.frames.push([img.src, performance.now()]);
      if (rec.frames.length > 200) rec.frames.splice(0, 100);
    });
  };
  hook();
  new MutationObserver(hook).observe(document.body, {childList: true, subtree: true});
  document.addEventListener('mousedown', () => rec.clicks.push(performance.now()), true);
  window.trame.state.watch(['instance_shown', 'overlay_version'], (shown, version) =>
    rec.picks.push([performance.now(), shown, version]));
}"""


def open_app(page, url: str, timeout_s: float = 120.0) -> None:
    """Load the app and wait for the state, the four streamed views and the lesion targets."""
    page.goto(url)
    page.wait_for_function("() => window.trame && window.trame.state && window.trame.state.get('busy') !== undefined",
                           timeout=timeout_s * 1000)
    page.wait_for_function("() => [...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length >= 4",
                           timeout=timeout_s * 1000)
    page.wait_for_selector(VIEW_IMG, timeout=timeout_s * 1000)
    page.evaluate(_RECORDER_JS)
    wait_state(page, "(s.get('lesion_targets') || []).length > 0 && !s.get('busy')", timeout_s)


def now_ms(page) -> float:
    """The browser's clock (``performance.now()``, ms)."""
    return page.evaluate("performance.now()")


def last_click_ms(page) -> float:
    return page.evaluate("window.__segxai.clicks[window.__segxai.clicks.length - 1]")


def frame_time_ms(page, src: str) -> float | None:
    """When the frame ``src`` of the axial view finished loading (browser clock, ms)."""
    return page.evaluate("src => { const f = window.__segxai.frames.find(f => f[0] === src); return f ? f[1] : null; }",
                         src)


def pick_state_time_ms(page, lesion_id: int, version: int) -> float | None:
    """When the state first said lesion ``lesion_id``'s overlay is shown with a version above ``version``."""
    return page.evaluate("([id, v]) => { const p = window.__segxai.picks.find(p => p[1] === id && p[2] > v);"
                         " return p ? p[0] : null; }", [lesion_id, version])


def view_box(page) -> dict[str, float]:
    return page.locator(VIEW_IMG).first.bounding_box()


def target_point(page, target: dict[str, float]) -> tuple[float, float]:
    """Page coordinates of a lesion target (fractions of the axial view image, top-left origin)."""
    box = view_box(page)
    return box["x"] + target["x"] * box["width"], box["y"] + target["y"] * box["height"]


def park_mouse(page) -> None:
    """Move the mouse off the views (hover effects and the pick cursor are not part of a screenshot)."""
    page.mouse.move(1, 1)


def view_pixels(page) -> np.ndarray:
    """A screenshot of the axial view image, ``(height, width, 3)`` uint8 RGB."""
    from PIL import Image as PILImage

    png = page.locator(VIEW_IMG).first.screenshot(animations="disabled", caret="hide")
    return np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"))


def view_src(page) -> str:
    """The current frame of the axial view (the streamed image's ``src``: a new one per frame)."""
    return page.evaluate("sel => document.querySelector(sel).currentSrc || document.querySelector(sel).src", VIEW_IMG)


def settled_pixels(page, quiet_s: float = 0.5, timeout_s: float = 15.0) -> np.ndarray:
    """The view once no new frame arrived for ``quiet_s`` (after interaction the server sends
    frames at an interactive quality, then a final one)."""
    deadline = time.monotonic() + timeout_s
    src, since = view_src(page), time.monotonic()
    while time.monotonic() < deadline:
        page.wait_for_timeout(25)
        now = view_src(page)
        if now != src:
            src, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return view_pixels(page)


def changed_fraction(before: np.ndarray, after: np.ndarray, noise: int, centre: tuple[float, float],
                     radius: float) -> float:
    """The fraction of the pixels within ``radius`` (a fraction of the image's smaller side) of
    ``centre`` (fractions of width, height from the top-left corner) whose largest channel
    difference exceeds ``noise``."""
    height, width = before.shape[:2]
    around = disc((height, width), (centre[0] * width, centre[1] * height), radius * min(width, height))
    return float((difference(before, after) > noise)[around].mean())


def wait_view_change(page, before: np.ndarray, noise: int, centre: tuple[float, float], radius: float,
                     timeout_s: float, fraction: float = 0.5) -> dict[str, Any]:
    """Wait for the first frame of the axial view in which more than ``fraction`` of the pixels
    around ``centre`` changed by more than ``noise`` from ``before``.

    Each new frame (a new ``src``) is screenshotted once. Returns ``{"pixels", "fraction",
    "frame_ms"}`` (``frame_ms``: its load time on the browser's clock), or ``{"pixels",
    "fraction", "frame_ms": None}`` of the last frame on timeout.
    """
    deadline = time.monotonic() + timeout_s
    seen = None
    pixels, value = before, 0.0
    while True:
        src = view_src(page)
        if src != seen:
            seen = src
            pixels = view_pixels(page)
            value = changed_fraction(before, pixels, noise, centre, radius)
            if value > fraction and view_src(page) == src:  # still that frame: the time is its time
                return {"pixels": pixels, "fraction": value, "frame_ms": frame_time_ms(page, src)}
            if value > fraction:  # a later frame replaced it meanwhile: it showed the change as well
                seen = None
                continue
        if time.monotonic() > deadline:
            return {"pixels": pixels, "fraction": value, "frame_ms": None}
        page.wait_for_timeout(10)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel largest channel difference, ``(height, width)`` int."""
    if a.shape != b.shape:
        raise ValueError(f"screenshots differ in size: {a.shape} vs {b.shape}")
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean mask of the pixels within ``radius`` of ``centre`` (x, y in pixels)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 <= radius**2


def measure_noise(page) -> int:
    """The largest per-pixel difference between frames of an unchanged scene: a settled frame, and
    every frame after a click in the view with pick mode off (the stream may send frames
    at its interactive quality after an interaction), then the settled one."""
    ensure_pick_mode(page, False)
    park_mouse(page)
    reference = settled_pixels(page)
    box = view_box(page)
    # top middle: off the view's own widgets (the 3D button top left, the slice slider at the bottom)
    page.mouse.click(box["x"] + 0.5 * box["width"], box["y"] + 0.04 * box["height"])
    noise, seen, start = 0, None, time.monotonic()
    while time.monotonic() - start < 1.5:
        src = view_src(page)
        if src != seen:
            seen = src
            noise = max(noise, int(difference(reference, view_pixels(page)).max()))
        page.wait_for_timeout(10)
    park_mouse(page)
    return max(noise, int(difference(reference, settled_pixels(page)).max()))


def ensure_pick_mode(page, on: bool, timeout_s: float = 10.0) -> None:
    """Toggle ``segxai-pick`` until ``pick_mode`` is ``on``."""
    if bool(get(page, "pick_mode")) != on:
        page.click("#segxai-pick")
    wait_state(page, "s.get('pick_mode') === arg", timeout_s, arg=on)


def wait_idle(page, timeout_s: float = 120.0) -> None:
    wait_state(page, "!s.get('busy')", timeout_s)


# --- the websocket handshake without the browser (wslink's hello) --------------------------------

def websocket_hello(base: str, secret: str, cookie_secret: str | None) -> dict[str, Any]:
    """Open the app's websocket (``/ws``) and send wslink's hello with ``secret``.

    ``cookie_secret``: first GET ``index.html?secret=<cookie_secret>`` in the same session (the
    app's cookie, whatever its name, then travels with the websocket request); ``None``: no cookie.
    Returns ``{"handshake": HTTP status or 101, "reply": the decoded hello reply or None}``.
    """
    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    async def run() -> dict[str, Any]:
        jar = aiohttp.CookieJar(unsafe=True)  # cookies of an IP host (127.0.0.1) are rejected otherwise
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            if cookie_secret is not None:
                async with session.get(f"{base}index.html?secret={cookie_secret}") as response:
                    await response.read()
            try:
                ws = await session.ws_connect(base.replace("http://", "ws://") + "ws", timeout=aiohttp.ClientWSTimeout(ws_close=5))
            except aiohttp.WSServerHandshakeError as error:
                return {"handshake": error.status, "reply": None}
            async with ws:
                hello = {"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello", "args": [{"secret": secret}]}
                for chunk in generate_chunks(msgpack.packb(hello), 0):
                    await ws.send_bytes(chunk)
                unchunker = UnChunker()
                unchunker.set_max_message_size(1 << 30)  # after the hello the state may arrive
                try:
                    async with asyncio.timeout(10):
                        async for message in ws:
                            if message.type != aiohttp.WSMsgType.BINARY:
                                break
                            full = unchunker.process_chunk(message.data)
                            if full is not None and full.get("id") == "system:c0:0":
                                return {"handshake": 101, "reply": full}
                except TimeoutError:
                    pass
                return {"handshake": 101, "reply": None}

    # in a thread of its own: Playwright's sync API keeps an event loop running in this one
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()
