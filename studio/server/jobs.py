"""The job queue: jobs are planned when submitted (bad input is refused then), wait in order,
and run one at a time on one worker thread (one device; two jobs at once would only fight over
it), through Engine.execute as `studio image` runs them.

Each job keeps a list of events (queued, started, status, progress, note, output, and one of
done / failed / cancelled at the end) that server-sent-event readers follow from any point; the
worker thread appends, the event loop wakes its readers. Cancel: a queued job leaves the queue; a
running one stops at its next progress step or output (a denoising step, a token, an image),
keeping the outputs finished before it.

A job either writes into one of the server's output folders (the gallery shows it), or, for a
CLI client (`studio image --server URL`), keeps its encoded files in a private temp folder until
the client has fetched them and writes them where the client runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from studio.engine import Engine, Plan
from studio.errors import StudioError
from studio.progress import Progress, TaskHandle

log = logging.getLogger("studio.server")

MAX_QUEUED = 64  # more waiting jobs than this is a 429: a client in a loop should back off
KEEP_FINISHED = 200  # finished jobs remembered (status, events); older ones are forgotten
FETCH_TTL_S = 600.0  # a client's files not fetched within this long after its job ends are removed
PROGRESS_EVERY_S = 0.1  # progress events per bar at most this often (a token per event would flood)


class Cancelled(BaseException):
    """Raised inside a running job's progress callback. A BaseException, as KeyboardInterrupt is,
    so a pipeline's `except Exception` around a library call cannot swallow it."""


@dataclass
class Job:
    id: str
    task: str
    plan: Plan
    keep_files: bool  # True: files kept for the client to fetch; False: written to the gallery folder
    remote: bool  # submitted by a client off loopback
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    status: str = "queued"  # queued | running | done | failed | cancelled
    events: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    files: Path | None = None  # keep_files: the temp folder holding the encoded outputs
    cancel: threading.Event = field(default_factory=threading.Event)
    waiters: set = field(default_factory=set)  # asyncio.Events of readers (touched on the loop only)

    @property
    def done(self) -> bool:
        return self.status in ("done", "failed", "cancelled")

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "status": self.status, "created": self.created,
                "started": self.started, "finished": self.finished, "request": request_dict(self.plan.request),
                "model": getattr(self.plan.spec, "alias", None) or getattr(self.plan.spec, "name", None),
                "outputs": self.outputs, "error": self.error, "events": len(self.events)}


def request_dict(request: Any) -> dict[str, Any]:
    import dataclasses

    from studio.outputs import _jsonable

    return _jsonable({f.name: getattr(request, f.name) for f in dataclasses.fields(request)})


class JobProgress(Progress):
    """The engine's Progress, turned into job events: bars become `progress` events, `status`
    (loading a model) and notes become events, and every step checks for a cancel."""

    def __init__(self, queue: "JobQueue", job: Job):
        super().__init__(enabled=False)
        self.queue, self.job = queue, job

    def task(self, description: str, total: float | None = None) -> TaskHandle:
        return JobHandle(self, description, total)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        self.queue.publish(self.job, {"type": "status", "text": text})
        yield

    def note(self, text: str) -> None:
        self.queue.publish(self.job, {"type": "note", "text": text})

    def streamer(self, tokenizer: Any, on_text: Any = None, handle: Any = None, skip_prompt: bool = True) -> Any:
        """Streamed text (`studio code` prints tokens as they come) goes to the client as `text`
        events instead of to the server's stdout."""
        def publish(text: str) -> None:
            self.queue.publish(self.job, {"type": "text", "text": text})

        return super().streamer(tokenizer, on_text=on_text or publish, handle=handle, skip_prompt=skip_prompt)


class JobHandle(TaskHandle):
    def __init__(self, progress: JobProgress, description: str, total: float | None):
        super().__init__(progress, None)
        self.progress, self.description, self.total, self.completed = progress, description, total, 0.0
        self._last = 0.0
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        job = self.progress.job
        if job.cancel.is_set():
            raise Cancelled()
        now = time.monotonic()
        finished = self.total is not None and self.completed >= self.total
        if force or finished or now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self.progress.queue.publish(job, {"type": "progress", "description": self.description,
                                              "completed": self.completed, "total": self.total})

    def advance(self, n: float = 1) -> None:
        self.completed += n
        self._send()

    def update(self, description: str | None = None, **fields: Any) -> None:
        if description is not None:
            self.description = description
        self._send()

    def set_total(self, total: float) -> None:
        self.total = total
        self._send(force=True)

    def finish(self) -> None:
        self.completed = self.total or self.completed
        self._send(force=True)


class QueueFull(StudioError):
    status = 429


class JobQueue:
    def __init__(self, warm: Any, on_output: Any = None):
        self.warm = warm  # cache.WarmModels
        self.on_output = on_output  # called with (job, result) after an output is written (the gallery)
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.current: Job | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            for job in self.waiting:
                job.cancel.set()
            if self.current is not None:
                self.current.cancel.set()
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for job in list(self.jobs.values()):
            self._remove_files(job)

    # ------------------------------------------------------------------ submit, cancel, forget
    def submit(self, plan: Plan, *, keep_files: bool, remote: bool) -> Job:
        with self.lock:
            if len(self.waiting) >= MAX_QUEUED:
                raise QueueFull(f"{len(self.waiting)} jobs are waiting already", "wait for some to finish, then submit again")
            job = Job(id=secrets.token_hex(8), task=plan.task, plan=plan, keep_files=keep_files, remote=remote)
            self.jobs[job.id] = job
            self.waiting.append(job)
            position = len(self.waiting) + (self.current is not None)
            self._forget_old()
            self.lock.notify_all()
        self.publish(job, {"type": "queued", "position": position})
        return job

    def cancel(self, job: Job) -> None:
        with self.lock:
            job.cancel.set()
            if job in self.waiting:
                self.waiting.remove(job)
                self._finish(job, "cancelled")

    def forget(self, job: Job) -> None:
        """The client has what it needs: cancel if still going, drop its files and its record."""
        self.cancel(job)
        with self.lock:
            if job.done:
                self.jobs.pop(job.id, None)
                self._remove_files(job)

    def position(self, job: Job) -> int | None:
        with self.lock:
            if job in self.waiting:
                return list(self.waiting).index(job) + 1 + (self.current is not None)
        return None

    # ------------------------------------------------------------------ events
    def publish(self, job: Job, event: dict[str, Any]) -> None:
        with self.lock:
            event = {"seq": len(job.events), "job": job.id, "time": round(time.time(), 3), **event}
            job.events.append(event)
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed while we were publishing
                self.loop.call_soon_threadsafe(self._wake, job)

    @staticmethod
    def _wake(job: Job) -> None:
        for waiter in list(job.waiters):
            waiter.set()

    async def follow(self, job: Job, since: int = 0, ping_s: float = 15.0) -> Any:
        """Events of `job` from number `since` on, as they come, until its last one; None now and
        then while nothing happens (the caller sends a keep-alive comment)."""
        index = max(0, since)
        while True:
            while index < len(job.events):
                yield job.events[index]
                index += 1
            if job.done and index >= len(job.events):
                return
            waiter = asyncio.Event()
            job.waiters.add(waiter)
            try:
                if index < len(job.events) or job.done:
                    continue  # something came in between the check and the registration
                try:
                    await asyncio.wait_for(waiter.wait(), ping_s)
                except asyncio.TimeoutError:
                    yield None
            finally:
                job.waiters.discard(waiter)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self._stop:
                    self.lock.wait(timeout=5)
                    self._expire_files()
                if self._stop:
                    return
                job = self.waiting.popleft()
                self.current = job
            try:
                self._run(job)
            finally:
                with self.lock:
                    self.current = None

    def _run(self, job: Job) -> None:
        job.started = time.time()
        job.status = "running"
        self.publish(job, {"type": "started"})
        plan = job.plan
        progress = JobProgress(self, job)
        engine = Engine(plan.options, progress=progress)
        writer = None
        try:
            if job.keep_files:
                from studio.outputs import OutputWriter

                job.files = Path(tempfile.mkdtemp(prefix=f"studio-job-{job.id}-"))
                writer = OutputWriter(job.files, task=plan.task, template="{index}", sidecar=False, manifest=False)
            if getattr(plan.cls, "needs_model", True):
                with progress:
                    self.warm.load(plan.task, plan.spec, engine.device_for(plan), progress)
            for index, result in enumerate(engine.execute(plan, job=job.id)):
                if writer is not None:
                    writer.write(result, index)
                self.publish(job, {"type": "output", **self._output(job, result, index)})
                if self.on_output is not None and not job.keep_files:
                    self.on_output(job, result)
                result.value, result.companions = None, {}  # the file has it; memory stays flat
                if job.cancel.is_set():
                    raise Cancelled()
            self._finish(job, "done")
        except Cancelled:
            self._finish(job, "cancelled")
        except StudioError as exc:
            self._finish(job, "failed", {"message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code})
        except Exception as exc:  # a bug or a library failure: one line for the client, the traceback here
            log.exception("job %s failed", job.id)
            first = (str(exc).strip().splitlines() or [""])[0]
            self._finish(job, "failed", {"message": f"{type(exc).__name__}: {first}",
                                         "hint": "see the server's log for the traceback", "exit_code": 1})

    def _output(self, job: Job, result: Any, index: int) -> dict[str, Any]:
        from studio.outputs import _jsonable

        meta = dict(result.metadata or {})
        out: dict[str, Any] = {"index": index, "kind": result.kind, "fmt": result.fmt,
                               "name": result.path.name if result.path else None,
                               "params": _jsonable(result.params), "extra": _jsonable(result.extra),
                               "companions": meta.get("companions") or {}, "is_dir": bool(result.path and result.path.is_dir())}
        if result.kind == "text":
            out["text"] = result.value
        if job.keep_files and result.path is not None:
            out["url"] = f"/api/jobs/{job.id}/files/{result.path.name}"
        elif result.path is not None:
            out["path"] = str(result.path)
        job.outputs.append(out)
        return out

    def _finish(self, job: Job, status: str, error: dict[str, Any] | None = None) -> None:
        job.status = status
        job.error = error
        job.finished = time.time()
        event: dict[str, Any] = {"type": status, "outputs": len(job.outputs)}
        if error:
            event.update(error)
        self.publish(job, event)

    # ------------------------------------------------------------------ housekeeping
    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.done]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self.jobs.pop(job.id, None)
            self._remove_files(job)

    def _expire_files(self) -> None:
        now = time.time()
        for job in list(self.jobs.values()):
            if job.files is not None and job.finished and now - job.finished > FETCH_TTL_S:
                self._remove_files(job)

    @staticmethod
    def _remove_files(job: Job) -> None:
        if job.files is not None:
            shutil.rmtree(job.files, ignore_errors=True)
            job.files = None
