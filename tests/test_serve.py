"""`studio serve`: the API in process (FastAPI's TestClient, a real uvicorn on a loopback port
where the wire matters), on the tiny SD model. A job from the API writes the same pixels as the
CLI; bad input is refused when submitted with the CLI's own line and hint; progress comes as
server-sent events; cancel stops a run; the gallery sees files the CLI writes while it runs; and
nothing outside the output folders is served, whatever the path looks like."""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = ("127.0.0.1", 40000)  # a loopback client: trusted like the CLI
FAST = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gallery")


@pytest.fixture(scope="module")
def server(gallery_dir):
    from studio.server.app import Server
    from studio.server.security import Policy

    return Server(Policy(roots=[gallery_dir], port=8000))


@pytest.fixture(scope="module")
def client(server):
    from fastapi.testclient import TestClient

    from studio.server.app import create_app

    with TestClient(create_app(server), base_url="http://127.0.0.1:8000", client=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def live(server):
    """The same server on a real loopback port (uvicorn in a thread)."""
    from studio.server.app import Background, create_app

    with Background(create_app(server)) as url:
        yield url


def post_job(client, task, params, **body):
    return client.post("/api/jobs", json={"task": task, "params": params, **body})


def events(client, job_id):
    """Every server-sent event of a job, parsed, until its last one."""
    found = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                found.append(json.loads(line[5:]))
                if found[-1]["type"] in ("done", "failed", "cancelled"):
                    break
    return found


def wait_done(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["status"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


# ---------------------------------------------------------------------- jobs
def test_job_runs_streams_progress_and_lands_in_the_gallery(client, tiny, gallery_dir, cli, tmp_path):
    model = str(tiny("sd"))
    response = post_job(client, "image", {"prompt": "a red cube", "model": model, "seed": 7, **FAST})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["seed"] == 7 and job["request"]["steps"] == 2

    seen = events(client, job["id"])
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "started" in kinds
    steps = [e for e in seen if e["type"] == "progress" and e["total"] == 2]
    assert steps and steps[-1]["completed"] == 2  # the denoising bar, step by step
    output = next(e for e in seen if e["type"] == "output")
    written = Path(output["path"])
    assert written.parent == gallery_dir.resolve() and written.exists()

    # the same request on the command line makes the same pixels
    result = cli("image", "a red cube", "--model", model, "--seed", "7", "--steps", "2", "--width", "64",
                 "--height", "64", "-o", tmp_path / "cli")
    assert result.exit_code == 0, result
    local = next((tmp_path / "cli").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(written)))

    items = client.get("/api/gallery").json()["items"]
    assert items[0]["name"] == written.name  # newest first
    detail = client.get(f"/api/gallery/{items[0]['id']}").json()
    assert detail["command"].startswith("studio image 'a red cube' --model ")
    assert "--seed 7" in detail["command"] and detail["metadata"]["params"]["seed"] == 7
    thumb = client.get(items[0]["thumb"])
    assert thumb.headers["content-type"] == "image/png"
    # a 64 px image is drawn at 3x in whole-pixel blocks, so the page's scaling keeps it sharp
    shown = Image.open(__import__("io").BytesIO(thumb.content))
    assert shown.size == (192, 192)
    assert np.array_equal(np.asarray(shown)[::3, ::3], np.asarray(Image.open(written).convert("RGB")))


def test_models_stay_warm_between_jobs(client, tiny):
    model = str(tiny("sd"))
    for seed in (1, 2):
        job = post_job(client, "image", {"prompt": "warm", "model": model, "seed": seed, **FAST}).json()
        wait_done(client, job["id"])
    status = client.get(f"/api/jobs/{job['id']}").json()
    assert status["outputs"][0]["extra"]["timings"]["load_s"] < 0.05  # no second load
    loaded = client.get("/api/models").json()["loaded"]
    assert [m["model"] for m in loaded].count(model) == 1 and loaded[0]["bytes"] > 0


@pytest.mark.parametrize("params, message", [
    ({"prompt": "x", "steps": 0}, "--steps 0 must be at least 1"),
    ({"prompt": "x", "width": 65}, "--width 65 is not a multiple of 8"),
    ({"prompt": "x", "colour": "red"}, "unknown parameter 'colour' in the request"),
    ({"prompt": "x", "steps": "many"}, "parameter 'steps'"),
])
def test_bad_requests_are_refused_at_once_with_the_clis_line_and_hint(client, tiny, params, message):
    before = len(client.get("/api/jobs").json())
    response = post_job(client, "image", {"model": str(tiny("sd")), **params})
    assert response.status_code == 400, response.text
    body = response.json()
    assert message in body["error"] and body["hint"] and body["exit_code"] == 2
    assert "\n" not in body["error"]
    assert len(client.get("/api/jobs").json()) == before  # nothing queued


def test_the_same_error_line_as_the_cli(client, tiny, cli):
    result = cli("image", "x", "--model", str(tiny("sd")), "--steps", "0")
    assert result.exit_code == 2
    body = post_job(client, "image", {"prompt": "x", "model": str(tiny("sd")), "steps": 0}).json()
    assert result.stderr.splitlines()[0] == f"error: {body['error']}"
    assert result.stderr.splitlines()[1] == f"hint: {body['hint']}"


def test_unknown_task_and_missing_model(client):
    body = post_job(client, "imag", {}).json()
    assert body["error"] == "unknown task 'imag'" and "image" in body["hint"]
    response = post_job(client, "image", {"prompt": "x", "model": "/nowhere/at/all"})
    assert response.status_code == 400 and "/nowhere/at/all" in response.json()["error"]


def test_typed_task_routes_and_docs(client):
    schema = client.get("/openapi.json").json()
    assert "/api/tasks/image" in schema["paths"] and "/api/jobs/{job_id}/events" in schema["paths"]
    assert "ImageRequestParams" in schema["components"]["schemas"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert "'sha256-" in docs.headers["content-security-policy"]  # its one inline script, by hash
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200  # no CDN needed


def test_cancel_stops_a_running_job_and_a_queued_one(client, tiny):
    model = str(tiny("sd"))
    slow = post_job(client, "image", {"prompt": "slow", "model": model, "steps": 400, "width": 64, "height": 64}).json()
    queued = post_job(client, "image", {"prompt": "never", "model": model, **FAST}).json()
    assert queued["position"] == 2
    deadline = time.monotonic() + 60
    while client.get(f"/api/jobs/{slow['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    client.post(f"/api/jobs/{queued['id']}/cancel")
    client.post(f"/api/jobs/{slow['id']}/cancel")
    assert wait_done(client, slow["id"], timeout=30)["status"] == "cancelled"
    assert client.get(f"/api/jobs/{queued['id']}").json()["status"] == "cancelled"
    seen = events(client, slow["id"])
    assert seen[-1]["type"] == "cancelled" and not [e for e in seen if e["type"] == "output"]


# ---------------------------------------------------------------------- the CLI as a client
def test_cli_sends_the_job_and_writes_files_here(live, tiny, cli, tmp_path, gallery_dir):
    model = str(tiny("sd"))
    args = ["image", "a blue sphere", "--model", model, "--seed", "11", "--num", "2", "--steps", "2",
            "--width", "64", "--height", "64"]
    remote = cli(*args, "--server", live, "-o", tmp_path / "remote", "--json")
    assert remote.exit_code == 0, remote
    rows = [json.loads(line) for line in remote.stdout.splitlines()]
    assert [r["seed"] for r in rows] == [11, 12] and all(Path(r["path"]).exists() for r in rows)
    local = cli(*args, "-o", tmp_path / "local", "--json")
    for a, b in zip(rows, [json.loads(line) for line in local.stdout.splitlines()]):
        assert Path(a["path"]).name == Path(b["path"]).name
        assert np.array_equal(np.asarray(Image.open(a["path"])), np.asarray(Image.open(b["path"])))
    manifest = (tmp_path / "remote" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 2 and json.loads(manifest[0])["seed"] == 11
    sidecar = json.loads(Path(rows[0]["path"]).with_suffix(".json").read_text())
    assert sidecar["model"]["source"] == model and sidecar["params"]["seed"] == 11
    assert not any(gallery_dir.glob("*a-blue-sphere*"))  # the server kept nothing of it


def test_cli_bad_input_through_the_server_is_the_same_exit_2(live, tiny, cli, monkeypatch):
    monkeypatch.setenv("STUDIO_SERVER", live)  # the variable, as a script would set it
    result = cli("image", "x", "--model", str(tiny("sd")), "--steps", "0")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == "error: --steps 0 must be at least 1"


def test_cli_without_a_server_says_so(cli, tmp_path):
    result = cli("image", "x", "--server", "http://127.0.0.1:9", "-o", tmp_path)
    assert result.exit_code == 2
    assert "cannot reach the studio server at http://127.0.0.1:9" in result.stderr
    assert "studio serve" in result.stderr


# ---------------------------------------------------------------------- the gallery index
def test_gallery_sees_folders_the_cli_writes_while_it_runs(client, tiny, cli, gallery_dir):
    before = client.get("/api/gallery").json()["total"]
    result = cli("image", "a green pyramid", "--model", str(tiny("sd")), "--seed", "3", "--steps", "2",
                 "--width", "64", "--height", "64", "-o", gallery_dir / "later" / "run1")
    assert result.exit_code == 0, result
    data = client.get("/api/gallery").json()
    assert data["total"] == before + 1
    assert data["items"][0]["prompt"] == "a green pyramid"
    assert data["items"][0]["file"].startswith("/files/0/later/run1/")
    assert client.get(data["items"][0]["file"]).status_code == 200


def test_gallery_filters(client, tiny, gallery_dir):
    from studio.outputs import OutputWriter, Result

    writer = OutputWriter(gallery_dir / "audio", task="music-audio")
    t = np.linspace(0, 1, 8000, dtype=np.float32)
    writer.write(Result(kind="audio", value=(np.sin(2 * np.pi * 220 * t) * np.linspace(0, 1, 8000), 8000),
                        params={"prompt": "a rising hum", "seed": 1}, extra={"model": {"name": "hum-model"}}))
    by_text = client.get("/api/gallery", params={"q": "RISING"}).json()
    assert [i["prompt"] for i in by_text["items"]] == ["a rising hum"]
    assert by_text["items"][0]["kind"] == "audio"
    assert "music-audio" in by_text["facets"]["tasks"] and "hum-model" in by_text["facets"]["models"]
    assert all(i["task"] == "image" for i in client.get("/api/gallery", params={"task": "image"}).json()["items"])
    assert client.get("/api/gallery", params={"model": "hum"}).json()["total"] == 1
    assert client.get("/api/gallery", params={"until": "2000-01-01"}).json()["total"] == 0
    assert client.get("/api/gallery", params={"since": "2000-01-01", "q": "hum"}).json()["total"] == 1
    # the waveform thumbnail: bars drawn over the dark background, louder to the right
    wave = np.asarray(Image.open(__import__("io").BytesIO(client.get(by_text["items"][0]["thumb"]).content)))
    lit = (wave[..., 2] > 200).sum(axis=0)
    assert lit[-40:].sum() > lit[:40].sum() > 0


def test_midi_thumbnail_is_a_piano_roll(client, gallery_dir):
    import pretty_midi

    from studio.outputs import OutputWriter, Result

    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i, pitch in enumerate((60, 64, 67, 72)):
        piano.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=i * 0.5, end=i * 0.5 + 0.4))
    midi.instruments.append(piano)
    OutputWriter(gallery_dir / "midi", task="music-midi").write(Result(kind="midi", value=midi, params={"seed": 5}))
    item = client.get("/api/gallery", params={"task": "music-midi"}).json()["items"][0]
    roll = np.asarray(Image.open(__import__("io").BytesIO(client.get(item["thumb"]).content))).astype(int)
    notes = roll[..., 0] > 200  # the note colour
    rows = np.nonzero(notes.any(axis=1))[0]
    first, last = np.nonzero(notes[:, :20].any(axis=1))[0], np.nonzero(notes[:, -40:].any(axis=1))[0]
    assert len(rows) > 4 and first.min() > last.max()  # a rising arpeggio: the last note sits highest


# ---------------------------------------------------------------------- safety
def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A GET with the path sent exactly as written (no client-side `..` clean-up)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"{host}:{port}")
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


def test_files_only_from_inside_the_output_folders(live, gallery_dir, tmp_path_factory):
    secret_dir = tmp_path_factory.mktemp("secret")
    (secret_dir / "secret.txt").write_text("TOP SECRET")
    (gallery_dir / "inside.txt").write_text("fine")
    os.symlink(secret_dir / "secret.txt", gallery_dir / "link.txt")
    os.symlink(secret_dir, gallery_dir / "linkdir")
    (gallery_dir / ".half.tmp.png").write_text("a temp file the writer has not published")
    rel = os.path.relpath(secret_dir / "secret.txt", gallery_dir)
    assert raw_get(live, "/files/0/inside.txt") == (200, b"fine")
    for path in [f"/files/0/{rel}", "/files/0/" + rel.replace("..", "%2e%2e"), "/files/0/" + rel.replace("/", "%2f"),
                 "/files/0/" + rel.replace("..", "%2E%2E").replace("/", "%2F"), f"/files/0/{secret_dir}/secret.txt",
                 f"/files/0//{secret_dir}/secret.txt", "/files/0/%2F" + str(secret_dir).lstrip("/") + "/secret.txt",
                 "/files/0/link.txt", "/files/0/linkdir/secret.txt", "/files/0/.half.tmp.png", "/files/1/inside.txt",
                 "/files/-1/inside.txt", "/files/0/inside.txt%00.png", "/files/0/..%5c..%5csecret.txt",
                 "/files/0/" + rel.replace("..", "%252e%252e")]:
        status, body = raw_get(live, path)
        assert status in (403, 404, 422), (path, status)
        assert b"TOP SECRET" not in body


def test_page_has_a_strict_csp_and_no_inline_script(client):
    import re

    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == []  # every script is a file
    assert " on" not in re.sub(r"\s+", " ", page.text).lower().replace(" one", "")  # no onclick= handlers
    js = client.get("/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_host_origin_and_body_checks_on_loopback(client):
    assert client.get("/api/gallery", headers={"host": "evil.example:8000"}).status_code == 403  # DNS rebinding
    evil = client.post("/api/jobs", json={"task": "image"}, headers={"origin": "http://evil.example"})
    assert evil.status_code == 403 and "evil.example" in evil.json()["error"]
    form = client.post("/api/jobs", content=b"task=image", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    huge = client.post("/api/jobs", json={"task": "image", "params": {"prompt": "x" * (2 << 20)}})
    assert huge.status_code == 413


def test_a_non_loopback_address_needs_a_token(tmp_path):
    from fastapi.testclient import TestClient

    from studio.errors import UsageError
    from studio.server.app import Server, create_app
    from studio.server.security import Policy

    with pytest.raises(UsageError, match="needs a token"):
        Policy(host="0.0.0.0", roots=[tmp_path])
    app = create_app(Server(Policy(host="0.0.0.0", token="s3cret-token", roots=[tmp_path])))
    with TestClient(app, base_url="http://192.0.2.1:8000") as c:
        assert c.get("/api/gallery").status_code == 401
        assert c.get("/api/gallery", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/gallery", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.get("/static/app.js").status_code == 401
        opened = c.get("/?token=s3cret-token", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"  # the token leaves the address bar
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=Strict" in opened.headers["set-cookie"]
        assert c.get("/").status_code == 200  # the cookie now
    from studio.server.app import Background

    with Background(app) as url:  # a path sent as written: `//host` must not become a redirect off this server
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "//evil.example/?token=s3cret-token")
        response = conn.getresponse()
        assert response.status == 303 and response.getheader("location") == "/evil.example/"


@pytest.mark.parametrize("params, options, words", [
    ({"prompt": "x", "model": "/etc"}, {}, "not a model alias"),
    ({"prompt": "x", "model": "someone/some-model"}, {}, "not a model alias"),
    ({"prompt": "x", "init_image": "/etc/hostname"}, {}, "outside the folders"),
    ({"prompt": "x", "controls": ["canny:/etc/hostname:0.5"]}, {}, "outside the folders"),
    ({"prompt": "x", "adapters": ["../../lora.safetensors:0.8"]}, {}, "not a model alias"),
    ({"prompt": "x", "num_outputs": 500}, {}, "over this server's limit"),
    ({"prompt": "x", "width": 8192, "height": 8192}, {}, "over this server's limit"),
    ({"prompt": "x"}, {"allow_pickle": True}, "may not set allow_pickle"),
    ({"prompt": "x"}, {"trust_remote_code": True}, "may not set trust_remote_code"),
])
def test_remote_clients_name_models_by_alias_and_files_inside_allowed_folders(server, params, options, words):
    from fastapi.testclient import TestClient

    from studio.server.app import create_app

    with TestClient(create_app(server), base_url="http://127.0.0.1:8000", client=("192.0.2.7", 5000)) as remote:
        response = remote.post("/api/jobs", json={"task": "image", "params": params, "options": options})
    assert response.status_code == 403, response.text
    assert words in response.json()["error"] and response.json()["hint"]


def test_remote_client_may_use_a_model_inside_an_allowed_folder(tiny, tmp_path):
    from fastapi.testclient import TestClient

    from studio.server.app import Server, create_app
    from studio.server.security import Policy

    model = tiny("sd")
    app = create_app(Server(Policy(roots=[tmp_path], allowed=[model.parent])))
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("192.0.2.7", 5000)) as remote:
        response = remote.post("/api/jobs", json={"task": "image", "params": {"prompt": "ok", "model": str(model), **FAST}})
        assert response.status_code == 202, response.text
        assert wait_done(remote, response.json()["id"])["status"] == "done"


# ---------------------------------------------------------------------- memory budget
def test_least_recently_used_model_is_evicted_under_the_budget(tiny):
    from studio import registry
    from studio.device import DeviceSettings, get_device_manager
    from studio.models import resolve
    from studio.server.cache import WarmModels, pipeline_bytes

    device = get_device_manager(DeviceSettings.from_sources(flags={"device": "cpu"}))
    a, b = resolve(str(tiny("sd")), task="image"), resolve(str(tiny("sd", seed=1)), task="image")
    warm = WarmModels(budget=1 << 40)
    first = warm.load("image", a, device)
    size = pipeline_bytes(first)
    assert size > 100_000
    warm.budget = int(size * 1.5)  # room for one of the two
    warm.load("image", b, device)
    keys = registry.loaded_keys()
    assert warm.key("image", b, device) in keys and warm.key("image", a, device) not in keys
    assert warm.describe()["evicted"] == [f"image:{a.name}"]
    warm.load("image", a, device)  # back again: now b is the older one
    assert warm.key("image", b, device) not in registry.loaded_keys()


def test_memory_budget_sizes_parse():
    from studio.errors import UsageError
    from studio.server.cache import parse_size

    assert parse_size("12GB") == 12 << 30 and parse_size("512m") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(UsageError, match="not a size"):
        parse_size("lots")


def test_serve_refuses_a_public_address_port_in_use_and_bad_folders(cli, tmp_path):
    import socket

    (tmp_path / "file").write_text("x")
    result = cli("serve", "--out", tmp_path / "file")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        result = cli("serve", "--port", busy.getsockname()[1], "--out", tmp_path / "o")
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.stderr
    result = cli("serve", "--memory-budget", "lots", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a size" in result.stderr


def test_a_manifest_row_naming_a_link_out_of_the_folder_is_not_shown(client, gallery_dir, tmp_path_factory):
    from studio.outputs import append_jsonl

    outside = tmp_path_factory.mktemp("private") / "private.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    sneaky = gallery_dir / "sneaky"
    sneaky.mkdir()
    os.symlink(outside, sneaky / "looks-fine.png")
    append_jsonl(sneaky / "manifest.jsonl", {"file": "looks-fine.png", "task": "image", "params": {"prompt": "sneaky"}})
    append_jsonl(sneaky / "manifest.jsonl", {"file": "../../private.png", "task": "image", "params": {"prompt": "sneaky"}})
    assert client.get("/api/gallery", params={"q": "sneaky"}).json()["total"] == 0


def test_the_tasks_memory_estimate_refuses_at_submit(client, tiny, monkeypatch):
    """The task's own resource estimate (studio/limits.py) runs when the job is submitted: a job
    that cannot fit is a 400 naming the estimate, before any memory is spent on it."""
    monkeypatch.setenv("STUDIO_MAX_MEMORY", "64M")
    response = post_job(client, "image", {"prompt": "x", "model": str(tiny("sd")), "width": 4096, "height": 4096, "steps": 2})
    assert response.status_code == 400, response.text
    body = response.json()
    assert "4096x4096 px needs about" in body["error"] and "STUDIO_MAX_MEMORY" in body["error"]
    assert "--width/--height" in body["hint"]
