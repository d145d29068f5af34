"""The CLI's side of `--server URL` (or STUDIO_SERVER): the same run, on a server's warm models.

`RemoteEngine(url, options).run(task, params)` answers like `Engine.run`: it posts the job
(return_files: the server keeps the encoded files for us instead of writing them into its
gallery), follows its server-sent events (progress bars, notes), fetches each output as soon as
it is made and writes it here through the local OutputWriter (same names, sidecar, manifest row;
the file's own bytes, metadata chunks included, are the server's), then tells the server to
forget the job. A refusal comes back as the CLI's own error line, hint and exit code; Ctrl-C
cancels the job on the server.

Standard library only (urllib): the CLI stays import-light, and no web framework is needed to
talk to the server.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.errors import RuntimeFailure, StudioError, UsageError

TOKEN_ENV = "STUDIO_SERVER_TOKEN"
TIMEOUT_S = 120.0  # a quiet stream still gets a keep-alive every 15 s; a load may take longer before the 202


class RemoteEngine:
    """Engine.run's interface, run by a `studio serve` at `url`."""

    def __init__(self, url: str, options: Any, progress: Any = None, emit: Callable[[dict[str, Any]], None] | None = None):
        from studio.progress import Progress

        self.base, self.token = _split_url(url)
        self.options = options
        self.progress = progress or Progress(enabled=not (options.quiet or options.json))
        self.emit = emit

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT_S) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("content-type", "application/json")
        if self.token:
            request.add_header("authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise _server_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"cannot reach the studio server at {self.base}: {reason}",
                             "start one with `studio serve`, or drop --server (and unset STUDIO_SERVER)") from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        with self._request(method, path, body) as response:
            return json.loads(response.read().decode("utf-8"))

    def _events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's server-sent events, parsed, as they arrive."""
        with self._request("GET", f"/api/jobs/{job_id}/events") as response:
            data: list[str] = []
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    # ------------------------------------------------------------------ the run
    def run(self, task: str, params: dict[str, Any], *, job: str | None = None, options: Any = None) -> list[Any]:
        from studio.outputs import OutputWriter

        opts = options or self.options
        # an unwritable --out fails now (exit 2), before the server does any work
        writer = OutputWriter(opts.out_dir, task=task, template=opts.template, overwrite=opts.overwrite) if opts.write else None
        body = {"task": task, "params": _jsonable({k: v for k, v in params.items() if v is not None}),
                "options": {**{k: v for k, v in opts.device.items() if v is not None}, "preset": opts.preset,
                            "save_preset": opts.save_preset, "allow_pickle": opts.allow_pickle,
                            "trust_remote_code": opts.trust_remote_code},
                "return_files": True}
        submitted = self._json("POST", "/api/jobs", body)
        job_id = submitted["id"]
        results: list[Any] = []
        bars: dict[str, Any] = {}
        finished = False
        try:
            with self.progress:
                for event in self._events(job_id):
                    kind = event.get("type")
                    if kind == "progress":
                        self._advance(bars, event)
                    elif kind == "note":
                        self.progress.note(event.get("text", ""))
                    elif kind == "text":  # streamed tokens (studio code), printed as they come, as locally
                        sys.stdout.write(event.get("text", ""))
                        sys.stdout.flush()
                    elif kind == "output":
                        results.append(self._output(job_id, task, event, writer))
                    elif kind == "failed":
                        error = StudioError(event.get("message") or "the job failed", event.get("hint"))
                        error.exit_code = int(event.get("exit_code") or 1)
                        raise error
                    elif kind == "cancelled":
                        raise RuntimeFailure(f"job {job_id} was cancelled on the server",
                                             f"{len(results)} output(s) were written before it stopped")
                    elif kind == "done":
                        finished = True
                        break
            if not finished:
                raise RuntimeFailure(f"the server closed job {job_id}'s event stream before it ended",
                                     "check the server's log; run the command again")
        finally:
            # done: the server drops the files it kept for us; interrupted (Ctrl-C): it cancels the job
            with contextlib.suppress(StudioError, OSError):
                self._json("DELETE", f"/api/jobs/{job_id}")
        return results

    def _advance(self, bars: dict[str, Any], event: dict[str, Any]) -> None:
        description = event.get("description") or "working"
        entry = bars.get(description)
        if entry is None:
            entry = bars[description] = [self.progress.task(description, total=event.get("total")), 0.0]
        handle, done = entry
        if event.get("total"):
            handle.set_total(event["total"])
        completed = float(event.get("completed") or 0)
        if completed > done:
            handle.advance(completed - done)
            entry[1] = completed

    def _output(self, job_id: str, task: str, event: dict[str, Any], writer: Any) -> Any:
        from studio.outputs import Result

        kind, name = event["kind"], event.get("name")
        params, extra = event.get("params") or {}, event.get("extra") or {}
        if writer is None or name is None:  # --no-write runs (captions printed): the payload only
            return Result(kind=kind, value=event.get("text"), params=params, extra=extra)
        with tempfile.TemporaryDirectory(prefix="studio-fetch-") as tmp:
            companions = {}
            for part, file in (event.get("companions") or {}).items():
                companions[part] = _decode_companion(self._fetch(job_id, file, Path(tmp)))
            local = self._fetch(job_id, name, Path(tmp))
            if event.get("is_dir"):
                result = Result(kind=kind, value=_frames(local), params=params, fmt="frames", extra=extra, companions=companions)
            else:
                fmt = Path(name).suffix.lstrip(".") or event.get("fmt") or "bin"
                result = Result(kind="file", value=local, params=params, fmt=fmt, extra=extra, companions=companions)
            writer.write(result, int(event.get("index") or 0))
        result.kind = kind
        result.value = event.get("text") if kind == "text" else None
        result.companions = {}
        if self.emit is not None:
            from studio.engine import Engine

            self.emit(Engine.summary(result))
        return result

    def _fetch(self, job_id: str, name: str, folder: Path) -> Path:
        target = folder / Path(name).name
        with self._request("GET", f"/api/jobs/{job_id}/files/{urllib.parse.quote(name)}") as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f)
        return target


def _split_url(url: str) -> tuple[str, str | None]:
    """'http://host:8000/?token=T' -> ('http://host:8000', 'T'); the token may also come from STUDIO_SERVER_TOKEN."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--server {url!r} is not an http(s) address", "e.g. --server http://127.0.0.1:8000")
    token = urllib.parse.parse_qs(parts.query).get("token", [None])[0] or os.environ.get(TOKEN_ENV) or None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}", token


def _server_error(exc: urllib.error.HTTPError) -> StudioError:
    try:
        body = json.loads(exc.read().decode("utf-8"))
    except (ValueError, OSError):
        body = {}
    message = body.get("error") or f"the server answered {exc.code} {exc.reason}"
    error = StudioError(message, body.get("hint"))
    error.exit_code = int(body.get("exit_code") or (2 if 400 <= exc.code < 500 else 1))
    return error


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _decode_companion(path: Path) -> Any:
    """A companion as the writer takes it: a PIL image (PNG), or (samples, rate) for a WAV."""
    if path.suffix.lower() == ".wav":
        import soundfile as sf

        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
        return samples.T if samples.shape[1] > 1 else samples[:, 0], rate
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.copy()


def _frames(zipped: Path) -> list[Any]:
    import zipfile

    from PIL import Image

    frames = []
    with zipfile.ZipFile(zipped) as zf:
        for name in sorted(zf.namelist()):
            with Image.open(io.BytesIO(zf.read(name))) as im:
                im.load()
                frames.append(im.copy())
    return frames
