"""A case run in the engine process, driven without threads: launch, poll, cancel, read.

GUIs (the Slicer panel, the browser viewer) never run the pipeline in their own interpreter:
they launch the engine process (``python -m SegXAILib.engine``, :mod:`SegXAILib.engine`), as
SlicerMONAIAuto3DSeg launches its inference. :class:`EngineJob` is that launch, Qt-free:

* the engine's JSON lines go to a file in the job folder (``engine.jsonl``), never to a pipe, so
  nothing has to drain a pipe on a thread (inside Slicer, PythonQt keeps the GIL while Qt's
  event loop runs: a reader thread would barely advance and the engine would block on a full
  pipe); :meth:`EngineJob.poll`, called from the GUI's timer, reads the lines written since;
* :meth:`EngineJob.cancel` ends the whole process tree: a terminate signal to the process
  group (the engine cancels and exits 130 within its grace time), then a kill after
  :data:`KILL_AFTER_S` seconds if anything is still running;
* :meth:`EngineJob.case` reads the finished case folder back (:func:`~SegXAILib.pipeline.read_case`).

Job folder layout: ``settings.json`` (what was run), ``engine.jsonl`` (progress lines),
``engine.stderr.txt`` (the engine's log) and ``case/`` (the case folder, ``case.json`` last).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..image import SegXAIInputError
from .settings import CaseSettings

__all__ = ["EngineJob", "JobStatus", "engine_command", "KILL_AFTER_S", "IMAGE_FORMATS"]

#: seconds between the terminate signal and the kill of whatever is left of the process tree
KILL_AFTER_S = 2.0
#: the case folder's image formats; NRRD keeps the geometry in float64 (NIfTI's sform is float32)
IMAGE_FORMATS = (".nrrd", ".nii.gz")


@dataclass
class JobStatus:
    """What a job is doing, as of the last :meth:`EngineJob.poll`.

    Attributes
    ----------
    state : str
        ``running``, ``done``, ``failed`` or ``cancelled``.
    fraction : float
        Progress in [0, 1] (the engine's last progress line).
    step, message : str
        The step the engine reported (``segment``, ``map smoothgrad``...) and its detail.
    elapsed_s : float
        Seconds since the launch.
    eta_s : float or None
        Estimated seconds left (elapsed time scaled by the fraction left), None until the run
        has made measurable progress.
    error : str
        Why a failed job failed (the engine's error line, else the tail of its log).
    exit_code : int or None
    estimate : str
        The estimate of the computation running (or last started): its memory and time from one
        measured pass (the engine's last ``estimate`` line); empty before the first.
    error_kind : str
        The kind of the engine's error line: ``input``, ``internal``, or ``cost`` (refused before
        it started because its estimated time is over the limit: run it again confirmed).
    refusal : dict
        With ``error_kind`` ``cost``: the refused computation's estimate (``seconds``, ``bytes``,
        ``items``, ``limit_seconds``, ``what``, ``text``).
    """

    state: str = "running"
    fraction: float = 0.0
    step: str = ""
    message: str = ""
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    error: str = ""
    exit_code: Optional[int] = None
    estimate: str = ""
    error_kind: str = ""
    refusal: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def text(self) -> str:
        """One line for a status bar: ``"map smoothgrad 42 % (about 1 min 10 s left)"``."""
        if self.state != "running":
            return {"done": "done", "cancelled": "cancelled"}.get(self.state, f"failed: {self.error}")
        words = " ".join(part for part in (self.step, self.message) if part) or "starting"
        line = f"{words} {100 * self.fraction:.0f} %"
        if self.eta_s is not None:
            minutes, seconds = divmod(int(round(self.eta_s)), 60)
            line += f" (about {minutes} min {seconds} s left)" if minutes else f" (about {seconds} s left)"
        return line


def engine_command(python: str, settings_path: Path, images: Sequence[Path], case_dir: Path,
                   reference: Optional[Path] = None, device: Optional[str] = None,
                   image_format: str = ".nrrd", max_minutes: Optional[float] = None,
                   case: Optional[Path] = None) -> list[str]:
    """The engine's command line (``python -m SegXAILib.engine SETTINGS IMAGE... --out DIR``);
    ``max_minutes``: its ``--max-minutes`` (0: no limit; None: the engine's default); ``case``:
    its ``--case`` (a saved case folder whose prediction the run reuses)."""
    # --exit-with-parent: a front end that dies (Slicer crashing, a killed viewer) leaves no engine
    # computing for nobody in its own process group
    command = [str(python), "-m", "SegXAILib.engine", str(settings_path), *[str(p) for p in images],
               "--out", str(case_dir), "--image-format", image_format, "--exit-with-parent"]
    if max_minutes is not None:
        command += ["--max-minutes", repr(float(max_minutes))]
    if case is not None:
        command += ["--case", str(case)]
    if reference is not None:
        command += ["--reference", str(reference)]
    if device:
        command += ["--device", str(device)]
    return command


def _package_root() -> str:
    """The folder holding the ``SegXAILib`` package (the engine must import this same copy)."""
    return str(Path(__file__).resolve().parent.parent.parent)


class EngineJob:
    """One case run in the engine process.

    Parameters
    ----------
    settings : CaseSettings
        What to run.
    images : sequence of path
        One image file per model input channel, in the card's order.
    job_dir : path
        A folder for this job alone (the layout in the module docstring; it may already hold
        the job's input files).
    python : str, optional
        The interpreter that runs the engine: ``PythonSlicer`` inside Slicer; this
        interpreter (``sys.executable``) by default.
    reference : path, optional
        A reference label map on the input grid (``--reference``).
    image_format : str
        The case folder's image format, one of :data:`IMAGE_FORMATS`.
    env : mapping, optional
        Extra environment variables of the engine (e.g. ``OMP_NUM_THREADS``; ``SEGXAI_MAX_MINUTES``:
        its default time limit).
    max_minutes : float, optional
        The engine's time limit: a computation estimated to take longer is refused before it
        starts (:attr:`JobStatus.error_kind` ``cost``); 0: no limit (a confirmed run); None: the
        engine's default (``SEGXAI_MAX_MINUTES``, else 10).
    case : path, optional
        A finished case folder of the same model and ``images`` (an earlier job's ``case/``): the
        engine reuses its saved prediction instead of predicting again (``--case``); a folder of
        another model or other images fails the job with the reason.

    Examples
    --------
    >>> job = EngineJob(settings, ["flair.nrrd", "t1.nrrd"], "jobs/0001").start()  # doctest: +SKIP
    >>> while not job.poll().finished:  # a GUI calls poll() from its timer instead
    ...     time.sleep(0.1)
    >>> case = job.case()
    """

    def __init__(self, settings: CaseSettings, images: Sequence[Union[str, os.PathLike]],
                 job_dir: Union[str, os.PathLike], python: Optional[str] = None,
                 reference: Optional[Union[str, os.PathLike]] = None, image_format: str = ".nrrd",
                 env: Optional[Mapping[str, str]] = None, max_minutes: Optional[float] = None,
                 case: Optional[Union[str, os.PathLike]] = None) -> None:
        if not isinstance(settings, CaseSettings):
            raise SegXAIInputError(f"settings: expected CaseSettings, got {type(settings).__name__}")
        if image_format not in IMAGE_FORMATS:
            raise SegXAIInputError(f"image_format: expected one of {IMAGE_FORMATS}, got {image_format!r}")
        self.settings = settings
        self.images = [Path(p) for p in images]
        for path in self.images:
            if not path.is_file():
                raise SegXAIInputError(f"images: {path} does not exist")
        self.job_dir = Path(job_dir)
        if (self.job_dir / "settings.json").exists() or self.case_dir.exists():
            raise SegXAIInputError(f"job_dir: {self.job_dir} holds another job (one folder per job)")
        self.python = python or sys.executable
        self.reference = Path(reference) if reference is not None else None
        self.image_format = image_format
        self.env = dict(env or {})
        if max_minutes is not None and not float(max_minutes) >= 0:
            raise SegXAIInputError(f"max_minutes: expected minutes >= 0 (0: no limit), got {max_minutes}")
        self.max_minutes = max_minutes
        self.saved_case = Path(case).resolve() if case is not None else None
        if self.saved_case is not None and not (self.saved_case / "case.json").is_file():
            raise SegXAIInputError(f"case: {case} is not a finished case folder (no case.json)")
        self.status = JobStatus()
        self.manifest: Optional[Path] = None
        self._process: Optional[subprocess.Popen] = None
        self._started = 0.0
        self._offset = 0
        self._partial = b""
        self._cancel_time: Optional[float] = None
        self._killed = False

    # ---- paths --------------------------------------------------------------------------------
    @property
    def case_dir(self) -> Path:
        return self.job_dir / "case"

    @property
    def log_path(self) -> Path:
        return self.job_dir / "engine.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.job_dir / "engine.stderr.txt"

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        return engine_command(self.python, self.job_dir / "settings.json", self.images, self.case_dir,
                              reference=self.reference, image_format=self.image_format,
                              max_minutes=self.max_minutes, case=self.saved_case)

    # ---- running ------------------------------------------------------------------------------
    def start(self) -> "EngineJob":
        """Write the settings and launch the engine in its own process group; returns self."""
        if self._process is not None:
            raise SegXAIInputError("job: already started")
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.settings.save(self.job_dir / "settings.json")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        # the engine imports the SegXAILib this process runs (an extension's copy, a checkout)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
        options: dict[str, Any] = {}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # no console window
            options = {"startupinfo": info, "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            options = {"start_new_session": True}  # its own process group: cancel ends the whole tree
        with open(self.log_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                             env=env, cwd=str(self.job_dir), **options)
        self._started = time.monotonic()
        return self

    def _read_events(self) -> list[dict]:
        """The complete JSON lines written since the last read (other lines are the log's)."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished line waits for the next poll
        events = []
        for line in lines:
            try:
                event = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                events.append(event)
        return events

    def poll(self) -> JobStatus:
        """Read the engine's new lines and whether it ended; never blocks."""
        status = self.status
        if self._process is None:
            raise SegXAIInputError("job: not started")
        if status.finished:
            return status
        code = self._process.poll()  # before reading: the lines of a finished process are complete
        now = time.monotonic()
        status.elapsed_s = now - self._started
        for event in self._read_events():
            if event["event"] == "progress":
                status.fraction = max(status.fraction, float(event.get("fraction", 0.0)))
                status.step, status.message = str(event.get("step", "")), str(event.get("message", ""))
            elif event["event"] == "estimate":
                status.estimate = str(event.get("message", ""))
            elif event["event"] == "error":
                status.error = str(event.get("message", ""))
                status.error_kind = str(event.get("kind", ""))
                if isinstance(event.get("estimate"), dict):
                    status.refusal = dict(event["estimate"])
            elif event["event"] == "done":
                self.manifest = Path(event["manifest"])
        if 0.02 <= status.fraction < 1.0 and status.elapsed_s > 1.0:
            status.eta_s = status.elapsed_s * (1.0 - status.fraction) / status.fraction
        if code is None:
            if self._cancel_time is not None and now - self._cancel_time > KILL_AFTER_S and not self._killed:
                self._kill()
            return status
        status.exit_code = code
        status.eta_s = None
        if self._cancel_time is not None or code == 130:
            status.state = "cancelled"
        elif code == 0 and self.manifest is not None:
            status.state, status.fraction = "done", 1.0
        else:
            status.state = "failed"
            status.error = status.error or self._stderr_tail() or f"the engine exited with code {code}"
        return status

    def _stderr_tail(self, lines: int = 8) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def cancel(self) -> None:
        """Ask the process tree to stop (the engine exits 130 and removes its unfinished
        files); :meth:`poll` kills what is left after :data:`KILL_AFTER_S` seconds."""
        if self._process is None or self.status.finished or self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        if self._process.poll() is not None:
            return
        try:
            if os.name == "nt":
                self._process.send_signal(signal.CTRL_BREAK_EVENT)  # the engine's SIGBREAK handler
            else:
                os.killpg(self._process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def _kill(self) -> None:
        self._killed = True
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True,
                               check=False)
            else:
                os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def wait(self, timeout: float = 3600.0, interval: float = 0.05) -> JobStatus:
        """Poll until the job ends (scripts, tests, batch use); a job still running after
        ``timeout`` seconds is cancelled, and the wait goes on until it has ended."""
        deadline = time.monotonic() + timeout
        while not self.poll().finished:
            if time.monotonic() > deadline:
                self.cancel()
            time.sleep(interval)
        return self.status

    def case(self, verify: bool = True, ijk_to_ras=None):
        """The finished case read back from its folder (:func:`~SegXAILib.pipeline.read_case`;
        ``ijk_to_ras``: the caller's exact matrix of the input grid)."""
        from .read import read_case

        if self.status.state != "done":
            raise SegXAIInputError(f"job {self.job_dir}: no case to read ({self.status.state})")
        return read_case(self.case_dir, verify=verify, ijk_to_ras=ijk_to_ras)
