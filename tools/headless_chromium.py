"""Drive a headless Chromium over the DevTools protocol on a pipe: open a page, run JavaScript, take a screenshot.

Standard library only: Chromium's `--remote-debugging-pipe` reads NUL-terminated JSON commands on
file descriptor 3 and writes replies and events to 4 (what Puppeteer's `pipe: true` uses), so no
websocket client, WebDriver or downloaded browser is needed; Debian's `chromium` package is enough.
Used by the results browser's tests (tests/test_browse.py), its benchmark (bench/browse_bench.py)
and to take the screenshot in docs/:

    python -m tools.headless_chromium report.html docs/img/browser.png [--width 1400 --height 1100]
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Root in a container has no sandbox; nothing here may reach the network or write outside the profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio", "--remote-debugging-pipe",
         "--disable-dev-shm-usage")  # containers often give /dev/shm 64 MB, too little for a renderer


class BrowserError(RuntimeError):
    """Chromium is missing, died, or a page script threw."""


def find_chromium() -> str | None:
    """The browser binary: $CHROMIUM, else the first of CANDIDATES on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


class Chromium:
    """One headless browser with one page. Use as a context manager; `open`, then `eval` and `screenshot`."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 1000, timeout_s: float = 30.0):
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(f"no Chromium found (tried $CHROMIUM and {', '.join(CANDIDATES)}); "
                               "on Debian: apt-get install -y chromium")
        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def child_fds():  # the protocol's fixed descriptors: commands on 3, replies on 4
            # via copies above 10, so neither pipe end can be overwritten by the other's dup2; the
            # copies close on exec, 3 and 4 stay open (Python opens every other descriptor non-inheritable)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                                      "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=child_fds, close_fds=False)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.events = b"", 0, []
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.send("Page.enable", session=True)
            self.send("Runtime.enable", session=True)
            self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ protocol

    def send(self, method: str, session: bool = False, **params) -> dict:
        """One command; its result, or BrowserError with the protocol's message."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout_s:.0f} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (status {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # ------------------------------------------------------------ page

    def open(self, url_or_path: str | Path) -> None:
        """Navigate and wait for the load event (a path becomes a file:// URL)."""
        url = str(url_or_path)
        if "://" not in url:
            url = Path(url).resolve().as_uri()
        self.events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_for(lambda e: e.get("method") == "Page.loadEventFired", "the page's load event")

    def wait_for(self, matches, what: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for event in self.events:
                if matches(event):
                    self.events.remove(event)
                    return event
            reply = self._receive(deadline)
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {self.timeout_s:.0f} s for {what}")
            self.events.append(reply)

    def eval(self, expression: str, await_promise: bool = False):
        """The JSON value of a page expression; BrowserError with the message when it throws."""
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"page script failed: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: str | Path, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            size = self.eval("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1})
        data = self.send("Page.captureScreenshot", session=True, **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.write(self._write, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.headless_chromium", description="Screenshot of a page in headless Chromium.")
    p.add_argument("page", help="an HTML file or a URL")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--script", help="JavaScript run after the load, before the shot (e.g. to open an item)")
    p.add_argument("--full-page", action="store_true")
    args = p.parse_args(argv)
    with Chromium(width=args.width, height=args.height) as browser:
        browser.open(args.page)
        if args.script:
            browser.eval(args.script, await_promise=True)
        print(browser.screenshot(args.png, args.full_page))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
