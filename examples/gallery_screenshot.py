"""The README's picture of the gallery: a few outputs of the built-in starter models (offline),
made through a running server's API, then photographed by Debian's headless Chromium (Playwright
with the system browser, as the browser tests use it).

    python examples/gallery_screenshot.py                 # writes docs/gallery.png
    python examples/gallery_screenshot.py --out /tmp/g.png

It is also a small example of the API: submit jobs with POST /api/jobs and follow each one's
server-sent events until it is done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def submit_and_wait(url: str, task: str, params: dict) -> None:
    request = urllib.request.Request(f"{url}/api/jobs", data=json.dumps({"task": task, "params": params}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
    job = json.loads(urllib.request.urlopen(request).read())
    with urllib.request.urlopen(f"{url}/api/jobs/{job['id']}/events") as events:
        for line in events:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if event["type"] in ("done", "failed", "cancelled"):
                    if event["type"] != "done":
                        raise SystemExit(f"{task} job {event['type']}: {event.get('message')}")
                    return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "gallery.png")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from studio.server.app import Background, Server, create_app
    from studio.server.security import Policy

    folder = Path(tempfile.mkdtemp(prefix="studio-gallery-"))
    with Background(create_app(Server(Policy(roots=[folder])))) as url:
        for seed, prompt in enumerate(["a red circle", "a blue square", "a green triangle on the left",
                                       "a small yellow circle at the top", "a purple square on a white background",
                                       "a big orange triangle"]):
            submit_and_wait(url, "image", {"prompt": prompt, "model": "starter-image", "seed": seed})
        submit_and_wait(url, "music-midi", {"model": "starter-midi", "bars": 4, "seed": 3, "chords": "C G Am F"})
        submit_and_wait(url, "music-midi", {"model": "starter-midi", "bars": 4, "seed": 4, "render": True,
                                            "key": "A:minor", "tempo": 100})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(url + "/")
            page.wait_for_function("() => [...document.querySelectorAll('#grid img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0) && document.querySelectorAll('#grid img').length >= 8")
            page.fill("#new-prompt", "a blue circle at the bottom")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
