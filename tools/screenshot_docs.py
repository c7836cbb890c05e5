"""Screenshots of the built docs site at phone and desktop width, with headless Chromium.

    mkdocs build                                          # the site, into ./site
    python tools/screenshot_docs.py                       # a few pages, 390 and 1280 px wide
    python tools/screenshot_docs.py --pages lessons/04_rope/ --widths 390 --out /tmp/shots

Serves the site folder on a local port, opens each page in headless Chromium at each width and
saves OUT/<page>-<width>.png (the first `--height` pixels of the page). Look at them for what a
reader on a phone meets: formulas cut at the right edge, figures too small to read, buttons over
text. Needs a Chromium (`apt-get install chromium`, or --chromium PATH). The images are for looking
at, not for the repository.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

PAGES = ["", "lessons/03_embedding_rmsnorm/", "lessons/04_rope/", "lessons/05_attention/",
         "lessons/10_quantized_matmul/", "benchmarks/"]


def find_chromium(given: str | None) -> str:
    for name in ([given] if given else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name) if name else None
        if path:
            return path
    sys.exit("screenshot_docs: no Chromium found; install one (apt-get install chromium) or pass "
             "--chromium PATH")


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def shoot(chromium: str, url: str, width: int, height: int, out: Path) -> None:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", f"--window-size={width},{height}",
           "--virtual-time-budget=3000", f"--screenshot={out}", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not out.exists():
        sys.exit(f"screenshot_docs: Chromium failed on {url}:\n{r.stderr[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", default="site", help="the built site folder (default: %(default)s)")
    p.add_argument("--pages", nargs="*", default=PAGES, help="paths of pages inside the site")
    p.add_argument("--widths", nargs="*", type=int, default=[390, 1280])
    p.add_argument("--height", type=int, default=2400, help="pixels of each page to capture")
    p.add_argument("--out", default="screenshots", help="folder for the images (default: %(default)s)")
    p.add_argument("--chromium", default=None, help="the browser to run")
    a = p.parse_args(argv)
    site = Path(a.site)
    if not (site / "index.html").exists():
        sys.exit(f"screenshot_docs: no built site at {site}/ (run `mkdocs build` first, or --site)")
    chromium = find_chromium(a.chromium)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    server, port = serve(site)
    try:
        for page in a.pages:
            name = page.strip("/").replace("/", "_") or "home"
            for w in a.widths:
                path = out / f"{name}-{w}.png"
                shoot(chromium, f"http://127.0.0.1:{port}/{page}", w, a.height, path)
                print(path)
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
