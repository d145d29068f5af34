"""`studio serve`: warm models behind a local HTTP API, and a gallery of every output.

Thin: options become a security Policy and a Server (studio/server/); uvicorn runs it. Nothing
heavy is imported until the command runs (FastAPI and the pipelines load then).
"""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from studio.cli.common import Globals, default_out_dir, global_options


def register(root: typer.Typer) -> None:
    root.command("serve")(serve)


@global_options("quiet", "offline")
def serve(
    host: Annotated[str, typer.Option(help="address to listen on; anything but loopback needs a token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free one)")] = 8000,
    out: Annotated[Optional[List[Path]], typer.Option("--out", "-o", help="output folder the gallery shows and jobs write to (repeatable; the first takes new jobs; default ./outputs)", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option(envvar="STUDIO_SERVER_TOKEN", help="require this token on every request (generated and printed off loopback when not given)", show_default=False)] = None,
    allow: Annotated[Optional[List[Path]], typer.Option("--allow", help="folder remote clients may name models and input files in (repeatable; the output folders always are)", show_default=False)] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="memory the warm models may hold, e.g. 12GB (default: 80% of the GPU, or half the RAM)", show_default=False)] = None,
    opts: Globals = None,
) -> None:
    """Serve the engine over HTTP (submit jobs for every task, follow progress, cancel, fetch files;
    API docs at /docs) and a gallery of every output at /. `studio image ... --server URL` (or
    STUDIO_SERVER=URL) then runs on the server's warm models and still writes its files here."""
    import sys

    from studio.errors import UsageError
    from studio.server.security import is_loopback, new_token

    roots = [p.expanduser() for p in (out or [default_out_dir("serve")])]
    for root in roots:
        if root.exists() and not root.is_dir():
            raise UsageError(f"--out {root} is a file, not a folder", "pass a folder")
        root.mkdir(parents=True, exist_ok=True)
    for folder in allow or []:
        if not folder.expanduser().is_dir():
            raise UsageError(f"--allow {folder} is not a folder", "pass a folder that exists")
    printed_token = None
    if not is_loopback(host) and not token:
        token = printed_token = new_token()

    from studio.server.app import Server, bind, create_app, uvicorn_server
    from studio.server.cache import parse_size
    from studio.server.security import Policy

    budget = parse_size(memory_budget) if memory_budget else None
    sock = bind(host, port)
    policy = Policy(host=host, port=sock.getsockname()[1], token=token, roots=roots,
                    allowed=[p.expanduser() for p in allow or []])
    server = Server(policy, budget=budget, offline=opts.offline)
    app = create_app(server)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{policy.port}/"
    lines = [f"studio serve: gallery {url}" + (f"?token={token}" if token else ""), f"  API docs {url}docs",
             f"  outputs {', '.join(str(r) for r in policy.roots)}",
             f"  use it: studio image \"a lighthouse\" --server {url.rstrip('/')}"]
    if printed_token:
        lines.append(f"  token (generated; clients send it as STUDIO_SERVER_TOKEN): {printed_token}")
    if not opts.quiet or printed_token:  # a generated token is the only way in: always shown
        sys.stderr.write("\n".join(lines if not opts.quiet else lines[-1:]) + "\n")
        sys.stderr.flush()
    uvicorn_server(app, log_level="warning" if not opts.quiet else "error").run(sockets=[sock])
