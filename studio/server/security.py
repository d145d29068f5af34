"""Who may ask the server for what. Safe by default:

- it binds loopback only; any other address needs a token, checked on every request (a bearer
  header, or a cookie the page gets from `/?token=...`), compared in constant time;
- bound to loopback, the Host header must name loopback (a DNS-rebinding page cannot reach it),
  and a request that changes something must come from the page itself (Origin) with a JSON
  body (a form on another site cannot post one without a CORS preflight we never answer);
- files are served only from inside the output folders: no `..`, no absolute paths, no link
  that resolves outside, nothing hidden (the writer's temp files);
- a remote client (one not on loopback) names models only by alias or as paths inside the
  allowed folders, names input files only inside them, cannot turn on pickle or remote code, and
  stays inside LIMITS; bodies are capped at MAX_BODY bytes for everyone;
- every page carries a strict Content-Security-Policy: scripts from this server only, no inline
  script, no inline style attribute, no plugins, no framing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs

from studio.errors import UsageError

TOKEN_COOKIE = "studio_token"
MAX_BODY = 1 << 20  # 1 MiB: a job is a few hundred bytes of JSON; prompts are capped by the tasks
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")

# What a remote client may ask of one job (a local one is as trusted as the CLI it could run).
LIMITS = {"num_outputs": 8, "steps": 150, "pixels": 2048 * 2048, "frames": 256, "duration": 120.0,
          "seconds": 300.0, "bars": 256, "max_tokens": 4096, "samples": 16}

# Request fields that name models: a remote client may use an alias, or a path inside the allowed folders.
MODEL_FIELDS = ("model", "clip_model", "motion_adapter", "controlnet", "control_models", "adapters")
# Request fields that name input files (possibly as TYPE:PATH[:SCALE] or PATH:SCALE).
PATH_FIELDS = ("init_image", "mask_image", "controls", "images", "inputs", "melody", "primer", "soundfont",
               "control_frames", "video", "audio", "tests", "context", "input")
SAFE_MODEL_NAMES = ("auto", "none", "")


class Refused(UsageError):
    """A request this server will not serve to this client (HTTP 403)."""

    status = 403


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class Policy:
    """The server's rules, fixed at start."""

    host: str = "127.0.0.1"  # the address it binds
    port: int = 0
    token: str | None = None  # required on every request when set (always set off loopback)
    roots: list[Path] = field(default_factory=list)  # output folders (served, and allowed inputs)
    allowed: list[Path] = field(default_factory=list)  # more folders remote clients may name models/inputs in
    max_body: int = MAX_BODY
    limits: dict[str, float] = field(default_factory=lambda: dict(LIMITS))

    def __post_init__(self) -> None:
        self.roots = [Path(os.path.realpath(p)) for p in self.roots]
        self.allowed = [Path(os.path.realpath(p)) for p in self.allowed]
        if not is_loopback(self.host) and not self.token:
            raise UsageError(f"--host {self.host} is not loopback, and serving it needs a token",
                             "pass --token SECRET, or let studio serve generate one")

    # ------------------------------------------------------------------ paths
    def safe_file(self, folder: int, relpath: str) -> Path:
        """The file `relpath` inside output folder number `folder`, or Refused. `relpath` is the
        URL path already percent-decoded once (a decoded `%2e%2e` is `..` here and is refused; a
        twice-encoded one is a literal name that does not exist)."""
        if not 0 <= folder < len(self.roots):
            raise Refused(f"no output folder {folder}", "GET /api/gallery lists the files")
        root = self.roots[folder]
        parts = relpath.replace("\\", "/").split("/")
        if ("\x00" in relpath or relpath.startswith("/") or os.path.isabs(relpath) or re.match(r"^[A-Za-z]:", relpath)
                or any(p in ("..", ".") or p.startswith(".") for p in parts) or not relpath):
            raise Refused(f"{relpath!r} is not a file inside the output folder", "use the paths /api/gallery gives")
        target = root.joinpath(*parts)
        real = Path(os.path.realpath(target))
        if not _inside(real, [root]):
            raise Refused(f"{relpath!r} leads outside the output folder", "studio serves only files inside its output folders")
        if not real.is_file():
            raise Refused(f"{relpath!r} is not a file in the output folder", "use the paths /api/gallery gives")
        return real

    def check_remote(self, task: str, params: dict[str, Any], options: dict[str, Any]) -> None:
        """What a client off loopback may not ask for (Refused, 403). Called before planning, so a
        refused path is never opened."""
        for flag in ("allow_pickle", "trust_remote_code", "save_preset", "overwrite"):
            if options.get(flag):
                raise Refused(f"a remote client may not set {flag}", "ask the server's owner to run it, or set it on the server")
        if params.get("unsafe_exec"):
            raise Refused("a remote client may not run generated code outside the sandbox", "drop unsafe_exec")
        preset = options.get("preset")
        if preset and _looks_like_path(str(preset)) and not self.allowed_path(str(preset)):
            raise Refused(f"preset {preset!r} is outside the folders this server allows", "name a preset by name")
        cards = _card_names()
        for name in MODEL_FIELDS:
            for value in _strings(params.get(name)):
                model = value if name != "adapters" else _strip_scale(value)
                if model in SAFE_MODEL_NAMES or model in cards:
                    continue
                if _looks_like_path(model) and self.allowed_path(model):
                    continue
                raise Refused(f"{name} {model!r} is not a model alias, nor a path inside the folders this server allows",
                              f"use an alias (`studio models list`) or a folder under {', '.join(map(str, self.roots + self.allowed)) or 'an allowed folder'}")
        for name in PATH_FIELDS:
            for value in _strings(params.get(name)):
                for part in [value, *value.split(":")]:
                    if part and _looks_like_path(part) and not self.allowed_path(part):
                        raise Refused(f"{name} names {part!r}, outside the folders this server allows",
                                      "put the file in one of its output folders (or one it was started with --allow)")
        self._check_limits(params)

    def _check_limits(self, params: dict[str, Any]) -> None:
        def over(name: str, value: Any, limit: float) -> None:
            raise Refused(f"{name} {value} is over this server's limit of {limit:g} for remote clients",
                          f"ask for at most {limit:g}, or run it on the server's machine")

        for name, limit in self.limits.items():
            value = params.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
                over(name, value, limit)
        seeds = params.get("seeds")
        if isinstance(seeds, (list, tuple)) and len(seeds) > self.limits["num_outputs"]:
            over("seeds (count)", len(seeds), self.limits["num_outputs"])
        width, height = params.get("width"), params.get("height")
        if isinstance(width, int) and isinstance(height, int) and width * height > self.limits["pixels"]:
            over("width x height", f"{width}x{height}", self.limits["pixels"])
        for name in ("width", "height"):
            value = params.get(name)
            if isinstance(value, int) and value * value > self.limits["pixels"] * 4:
                over(name, value, (self.limits["pixels"] * 4) ** 0.5)

    def allowed_path(self, value: str) -> bool:
        return _inside(Path(os.path.realpath(os.path.expanduser(value))), self.roots + self.allowed)


def _inside(real: Path, roots: Iterable[Path]) -> bool:
    text = str(real)
    return any(text == str(root) or text.startswith(str(root).rstrip(os.sep) + os.sep) for root in roots)


def _looks_like_path(value: str) -> bool:
    return (os.path.isabs(value) or value.startswith(("~", ".")) or "/" in value or "\\" in value
            or os.path.lexists(value))


def _strip_scale(value: str) -> str:
    head, sep, tail = value.rpartition(":")
    try:
        float(tail)
        return head if sep else value
    except ValueError:
        return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _card_names() -> set[str]:
    from studio.models import load_cards

    return set(load_cards())


# ---------------------------------------------------------------------- the guard (ASGI middleware)
class Guard:
    """Runs before every route: token, Host, Origin, JSON bodies, body size, security headers.
    Plain ASGI (not a BaseHTTPMiddleware) so server-sent events stream through it untouched."""

    def __init__(self, app: Any, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope["method"]
        problem = self._problem(scope, headers, method)
        if problem is not None:
            status, message, hint = problem
            return await _reply(send, status, {"error": message, "hint": hint}, self._extra_headers(scope))
        token_in_query = self.policy.token and _query_token(scope)
        if token_in_query and method == "GET" and not scope["path"].startswith("/api/"):
            # the page was opened with ?token=: keep it in a cookie and drop it from the address
            # bar (and from the history and Referer headers)
            cookie = f"{TOKEN_COOKIE}={self.policy.token}; HttpOnly; SameSite=Strict; Path=/"
            here = "/" + scope["path"].lstrip("/")  # never `//host`: a redirect stays on this server
            return await _reply(send, 303, None, [(b"location", here.encode("utf-8", "replace")), (b"set-cookie", cookie.encode())])

        async def secured_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self._extra_headers(scope)}
            await send(message)

        await self.app(scope, receive, secured_send)

    def _problem(self, scope: dict, headers: dict[str, str], method: str) -> tuple[int, str, str] | None:
        policy = self.policy
        if is_loopback(policy.host) and not policy.token:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if not is_loopback(name):
                return 403, f"Host {host!r} is not this server's loopback address", f"open http://127.0.0.1:{policy.port}/"
        if policy.token:
            given = _bearer(headers) or _cookie(headers) or _query_token(scope)
            if not given or not secrets.compare_digest(given.encode(), policy.token.encode()):
                return 401, "missing or wrong token", "open the address `studio serve` printed (it ends in ?token=...), or send Authorization: Bearer TOKEN"
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin and origin != "null" and origin.split("://", 1)[-1] != headers.get("host", ""):
                return 403, f"requests from {origin} are not accepted", "use the page this server serves"
            if origin == "null":
                return 403, "requests from an opaque origin are not accepted", "use the page this server serves"
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > policy.max_body:
                return 413, f"request body over {policy.max_body} bytes", "send a smaller request"
            if "transfer-encoding" in headers:
                # the body cap is checked on Content-Length, which the server then holds the body to
                return 411, "request bodies need a Content-Length", "send the JSON body in one piece"
            if length not in (None, "0") and \
                    not headers.get("content-type", "").split(";")[0].strip() == "application/json":
                return 415, "request bodies must be JSON", "send Content-Type: application/json"
        return None

    @staticmethod
    def _extra_headers(scope: dict) -> list[tuple[bytes, bytes]]:
        csp = DOCS_CSP.get("value") if scope["path"] == "/docs" else CSP
        return [(b"content-security-policy", (csp or CSP).encode()), (b"x-content-type-options", b"nosniff"),
                (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]


# The /docs page (Swagger UI, served from fastapi-offline's files) starts itself with one inline
# script; it is allowed by its hash, nothing else inline (app.py fills this in).
DOCS_CSP: dict[str, str] = {}


def csp_with_script_hashes(html: str) -> str:
    import base64

    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
              for body in re.findall(r"<script>(.*?)</script>", html, flags=re.S)]
    return (f"default-src 'none'; script-src 'self' {' '.join(hashes)}; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


def _cookie(headers: dict[str, str]) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    try:
        morsel = SimpleCookie(raw).get(TOKEN_COOKIE)
    except Exception:  # a malformed Cookie header is no token
        return None
    return morsel.value if morsel else None


def _query_token(scope: dict) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


async def _reply(send: Any, status: int, body: dict | None, headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})
