"""The routes. One FastAPI app over one job queue, one set of warm models and one gallery.

    POST   /api/jobs                 {task, params, options, return_files} -> 202 {id, ...}
    POST   /api/tasks/{task}         the same, typed per task (what /docs shows for each task)
    GET    /api/jobs[/{id}]          status; /api/jobs/{id}/events: server-sent events
    POST   /api/jobs/{id}/cancel     stop it (finished outputs stay); DELETE forgets it too
    GET    /api/jobs/{id}/files/NAME a client job's encoded output (a zip for a frames folder)
    GET    /api/gallery[/{id}]       the outputs, newest first, filtered; one output's metadata
    GET    /api/thumbs/{id}.png      its thumbnail
    GET    /files/{folder}/{path}    an output file, only from inside the output folders
    GET    /api/tasks, /api/models   what can be asked for, what is loaded
    GET    /                         the gallery page; /docs the API's own page

A job is planned when it is submitted (Engine.plan, then the pipeline's check_inputs on the warm
model), so a bad request is refused at once with the CLI's own message and hint as
{"error", "hint", "exit_code"} and a 4xx; nothing bad ever waits in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import typing
import zipfile
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException

from studio import registry
from studio.engine import Engine, RunOptions
from studio.errors import RuntimeFailure, StudioError, UsageError
from studio.progress import Progress
from studio.server import security
from studio.server.cache import WarmModels
from studio.server.gallery import MEDIA_TYPES, Gallery
from studio.server.jobs import JobQueue
from studio.server.security import Guard, Policy, Refused, is_loopback

STATIC = Path(__file__).parent / "static"
DEFAULT_TEMPLATE = "{date}-{task}-{seed}-{slug}"


class JobOptions(BaseModel):
    """How to run a job, as the CLI's global options say it (device flags, preset, trust)."""

    model_config = ConfigDict(extra="forbid")
    device: Optional[str] = Field(None, description="auto|cpu|cuda[:N]|mps")
    precision: Optional[str] = Field(None, description="auto|fp32|fp16|bf16")
    attention: Optional[str] = None
    offload: Optional[str] = None
    quantize: Optional[str] = None
    compile: Optional[bool] = None
    preset: Optional[str] = Field(None, description="preset name (or a file inside an allowed folder)")
    save_preset: Optional[str] = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    template: Optional[str] = Field(None, description="output file name template")
    out: int = Field(0, ge=0, description="which of the server's output folders (0 = the first --out)")

    def device_flags(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("device", "precision", "attention", "offload", "quantize", "compile")}


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(..., description="a task name: GET /api/tasks lists them")
    params: dict[str, Any] = Field(default_factory=dict, description="the task's request fields, as its CLI flags")
    options: JobOptions = Field(default_factory=JobOptions)
    return_files: bool = Field(False, description="keep the files for this client to fetch instead of the gallery folder")


def params_model(task: str) -> type[BaseModel]:
    """A pydantic model of `task`'s request: every field optional (unset: the card, preset or
    request default applies, as for a flag not given), types from the dataclass, so "20" becomes
    20 as the CLI's option parsing makes it. Unknown names pass through to the engine, which
    refuses them with the CLI's message."""
    cls = registry.pipeline_class(task)
    rt = cls.request_type
    try:
        hints = typing.get_type_hints(rt)
    except Exception:  # a hint that does not resolve outside TYPE_CHECKING: validate that one loosely
        hints = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(rt):
        fields[f.name] = (Optional[hints.get(f.name, Any)], None)
    return create_model(f"{rt.__name__}Params", __config__=ConfigDict(extra="allow"), **fields)


class Server:
    def __init__(self, policy: Policy, *, budget: int | None = None, offline: bool = False):
        self.policy = policy
        self.offline = offline
        self.warm = WarmModels(budget)
        self.gallery = Gallery(policy.roots)
        self.queue = JobQueue(self.warm)
        self.models: dict[str, type[BaseModel]] = {}

    def params(self, task: str, raw: dict[str, Any]) -> dict[str, Any]:
        model = self.models.get(task) or self.models.setdefault(task, params_model(task))
        rt = registry.pipeline_class(task).request_type
        try:
            parsed = model.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc, rt.__name__, prefix=("params",)) from None
        given = {k: getattr(parsed, k) for k in parsed.model_fields_set if k in type(parsed).model_fields}
        given.update(parsed.model_extra or {})
        return {k: v for k, v in given.items() if v is not None}

    def submit(self, body: JobIn, client_host: str | None) -> dict[str, Any]:
        """Plan and check a job, then queue it. Runs on a worker thread of the web server (a cold
        model loads here once; every later job of that model finds it warm)."""
        task = body.task
        registry.pipeline_class(task)  # an unknown task: the CLI's message, naming the tasks
        params = self.params(task, body.params)
        opts = body.options
        remote = not is_loopback(client_host)
        if remote:
            self.policy.check_remote(task, params, opts.model_dump())
        if opts.out >= len(self.policy.roots):
            raise UsageError(f"no output folder {opts.out}", f"this server has {len(self.policy.roots)} (0-{len(self.policy.roots) - 1})")
        run_options = RunOptions(device=opts.device_flags(), out_dir=self.policy.roots[opts.out], quiet=True,
                                 preset=opts.preset, save_preset=opts.save_preset, allow_pickle=opts.allow_pickle,
                                 trust_remote_code=opts.trust_remote_code, offline=self.offline,
                                 overwrite=opts.overwrite, template=opts.template or DEFAULT_TEMPLATE,
                                 write=not body.return_files)
        engine = Engine(run_options, progress=Progress(enabled=False))
        plan = engine.plan(task, params, source="the request")
        spec = plan.spec
        if remote and spec is not None and not spec.alias and not (spec.is_local and self.policy.allowed_path(spec.source)):
            raise Refused(f"model {spec.name!r} is neither an alias nor inside the folders this server allows",
                          "use an alias (`studio models list`)")
        if getattr(plan.cls, "needs_model", True):
            device = engine.device_for(plan)
            # the task's resource estimate against this device (studio/limits.py), before a load
            check_request = getattr(plan.cls, "check_request", None)
            if check_request is not None:
                check_request(plan.request, spec, device)
            pipeline = self.warm.load(task, spec, device)
            if hasattr(pipeline, "check_inputs"):
                pipeline.check_inputs(plan.request)
        job = self.queue.submit(plan, keep_files=body.return_files, remote=remote)
        return {**job.describe(), "position": self.queue.position(job),
                "urls": {"self": f"/api/jobs/{job.id}", "events": f"/api/jobs/{job.id}/events",
                         "cancel": f"/api/jobs/{job.id}/cancel"}}


def validation_error(exc: ValidationError, request_name: str, prefix: tuple = ()) -> UsageError:
    """pydantic's errors as the CLI's one line: the first problem, and what the request takes."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    loc = loc[len(prefix):] if tuple(loc[: len(prefix)]) == prefix else loc
    name = ".".join(loc) or "the request"
    given = first.get("input")
    shown = json.dumps(given)[:80] if given is not None and not isinstance(given, dict) else ""
    return UsageError(f"parameter {name!r}{' = ' + shown if shown else ''}: {first.get('msg', 'is not valid')}",
                      f"{request_name} takes its fields with JSON types (GET /api/tasks lists them)")


def error_body(exc: StudioError) -> tuple[int, dict[str, Any]]:
    status = getattr(exc, "status", None) or (400 if exc.exit_code == 2 else 500)
    return status, {"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}


def create_app(server: Server) -> Any:
    """The FastAPI app for `server`, wrapped in the security Guard."""
    queue, gallery, policy = server.queue, server.gallery, server.policy

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(queue.stop)

    app = FastAPI(title="studio", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Warm models behind a local API: submit a job for any task, follow its "
                              "progress as server-sent events, fetch its files; and a gallery of every output.")

    # ------------------------------------------------------------------ errors: one line and a hint
    @app.exception_handler(StudioError)
    async def studio_error(request: Request, exc: StudioError) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "the request"
        return JSONResponse({"error": f"{loc}: {first.get('msg', 'is not valid')}",
                             "hint": "see /docs for the request's fields", "exit_code": 2}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "hint": None, "exit_code": 2}, status_code=exc.status_code)

    # ------------------------------------------------------------------ jobs
    @app.post("/api/jobs", status_code=202, tags=["jobs"], summary="Submit a job for any task")
    def submit(body: JobIn, request: Request) -> dict[str, Any]:
        return server.submit(body, request.client.host if request.client else None)

    for task in sorted(registry.tasks()):
        _typed_route(app, server, task)

    @app.get("/api/jobs", tags=["jobs"], summary="Jobs, newest first")
    def jobs() -> list[dict[str, Any]]:
        return [dict(j.describe(), position=queue.position(j)) for j in reversed(list(queue.jobs.values()))]

    @app.get("/api/jobs/{job_id}", tags=["jobs"], summary="One job's status and outputs")
    def job_status(job_id: str) -> dict[str, Any]:
        job = _job(queue, job_id)
        return {**job.describe(), "position": queue.position(job)}

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"], summary="Progress as server-sent events",
             response_class=StreamingResponse)
    async def job_events(job_id: str, request: Request, since: int = 0) -> StreamingResponse:
        job = _job(queue, job_id)
        last = request.headers.get("last-event-id")
        if last and last.isdigit():
            since = int(last) + 1

        async def stream():
            async for event in queue.follow(job, since):
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                yield f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"], summary="Cancel a job (finished outputs stay)")
    def cancel(job_id: str) -> dict[str, Any]:
        job = _job(queue, job_id)
        queue.cancel(job)
        return job.describe()

    @app.delete("/api/jobs/{job_id}", tags=["jobs"], summary="Cancel a job if running, and forget it and its kept files")
    def forget(job_id: str) -> dict[str, Any]:
        job = _job(queue, job_id)
        queue.forget(job)
        return job.describe()

    @app.get("/api/jobs/{job_id}/files/{name}", tags=["jobs"], summary="A client job's output file")
    def job_file(job_id: str, name: str) -> Response:
        job = _job(queue, job_id)
        if job.files is None or "/" in name or "\\" in name or name.startswith(".") or not name:
            raise Refused(f"job {job_id} has no file {name!r}", "its files are kept until fetched, for 10 minutes")
        path = job.files / name
        if path.is_dir():
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
                for frame in sorted(path.iterdir()):
                    zf.write(frame, frame.name)
            return Response(buffer.getvalue(), media_type="application/zip")
        if not path.is_file():
            raise HTTPException(404, f"job {job_id} has no file {name!r}")
        return FileResponse(path, media_type="application/octet-stream")

    # ------------------------------------------------------------------ gallery
    @app.get("/api/gallery", tags=["gallery"], summary="Outputs, newest first, filtered")
    def gallery_items(q: str = "", task: str = "", model: str = "", since: str = "", until: str = "",
                      offset: int = 0, limit: int = 200) -> dict[str, Any]:
        everything = gallery.items()
        found = gallery.search(q=q, task=task, model=model, since=since, until=until)
        limit = max(1, min(limit, 1000))
        return {"total": len(found), "items": [i.summary() for i in found[offset: offset + limit]],
                "facets": gallery.facets(everything)}

    @app.get("/api/gallery/{item_id}", tags=["gallery"], summary="One output: metadata, command line, players")
    def gallery_item(item_id: str) -> dict[str, Any]:
        item = gallery.find(item_id)
        if item is None:
            raise HTTPException(404, f"no output {item_id}")
        return gallery.detail(item)

    @app.get("/api/thumbs/{item_id}.png", tags=["gallery"], summary="A thumbnail", response_class=Response)
    def thumb(item_id: str) -> Response:
        item = gallery.find(item_id)
        if item is None:
            raise HTTPException(404, f"no output {item_id}")
        return Response(gallery.thumbnail(item), media_type="image/png", headers={"cache-control": "private, max-age=60"})

    @app.get("/files/{folder}/{path:path}", tags=["gallery"], summary="An output file", response_class=FileResponse)
    def output_file(folder: int, path: str) -> FileResponse:
        real = policy.safe_file(folder, path)
        media = MEDIA_TYPES.get(real.suffix.lower())
        if media is None:  # anything else downloads, never renders in the page's origin
            return FileResponse(real, media_type="application/octet-stream", filename=real.name)
        return FileResponse(real, media_type=media)

    # ------------------------------------------------------------------ what there is
    @app.get("/api/tasks", tags=["server"], summary="Tasks and their request fields")
    def tasks() -> dict[str, Any]:
        out = {}
        for name in sorted(registry.tasks()):
            with contextlib.suppress(Exception):
                rt = registry.pipeline_class(name).request_type
                out[name] = {"request": rt.__name__,
                             "fields": [{"name": f.name, "type": str(f.type), "default": _default(f)} for f in dataclasses.fields(rt)]}
        return out

    @app.get("/api/models", tags=["server"], summary="Warm models and the memory budget")
    def models() -> dict[str, Any]:
        return server.warm.describe()

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _docs(app)
    return Guard(app, policy)


def _typed_route(app: FastAPI, server: Server, task: str) -> None:
    try:
        params = server.models.setdefault(task, params_model(task))
    except Exception:  # a plugin task that fails to import must not take the server down
        return
    body_model = create_model(f"{params.__name__.removesuffix('Params')}Job", __config__=ConfigDict(extra="forbid"),
                              params=(params, Field(default_factory=params)), options=(JobOptions, Field(default_factory=JobOptions)),
                              return_files=(bool, False))

    def submit_task(body: body_model, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        raw = body.params.model_dump(exclude_unset=True)
        job = JobIn(task=task, params=raw, options=body.options, return_files=body.return_files)
        return server.submit(job, request.client.host if request.client else None)

    # the annotations are strings in this module (PEP 563); FastAPI needs this body's real model
    submit_task.__annotations__ = {"body": body_model, "request": Request, "return": dict[str, Any]}
    app.post(f"/api/tasks/{task}", status_code=202, tags=["tasks"], summary=f"Submit a {task} job",
             name=f"submit_{task.replace('-', '_')}")(submit_task)


def _docs(app: FastAPI) -> None:
    """Swagger UI from fastapi-offline's copy (no CDN: the server may be offline), its one inline
    start-up script allowed by hash in that page's own CSP."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        import fastapi_offline

        assets = Path(fastapi_offline.__file__).parent / "static"
    except ImportError:
        return
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url="/openapi.json", title="studio API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")
        html = page.body.decode()
        security.DOCS_CSP["value"] = security.csp_with_script_hashes(html)
        return HTMLResponse(html)


def _job(queue: JobQueue, job_id: str) -> Any:
    job = queue.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return None
    return list(value) if isinstance(value, tuple) else value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)


def _version() -> str:
    from studio import __version__

    return __version__


def bind(host: str, port: int) -> Any:
    """A listening socket on (host, port); port 0 picks a free one. Bound before uvicorn starts,
    so the address printed (and a test's URL) is the real one."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "pick another --port (0 = any free one), or stop what uses it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, log_level: str = "warning") -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


class Background:
    """The server on a thread of this process (tests, benchmarks): `with Background(app) as url:`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
        import threading

        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeFailure("the studio server did not start", "see the log above")
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
