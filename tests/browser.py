"""Headless Chromium for tests: open a page, collect console errors and requests, take a
screenshot, evaluate JavaScript. Speaks the Chrome DevTools Protocol over
``--remote-debugging-pipe`` (JSON messages separated by NUL on fds 3/4), so no package beyond
the standard library and Debian's ``chromium`` is needed.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    env = os.environ.get("FXCOMPRESS_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


def _above(fd: int, low: int = 10) -> int:
    """``fd`` duplicated to the lowest free descriptor >= ``low`` (the original is closed)."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return new


class Chromium:
    """One headless Chromium process with one page.

    Use as a context manager; :meth:`open` loads a URL and waits for the load event.
    Attributes ``console_errors`` (console.error calls, uncaught exceptions, error log
    entries) and ``requests`` (every URL the page asked for) fill as events arrive.
    """

    def __init__(self, executable: str, *, width: int = 1280, height: int = 900,
                 javascript: bool = True, timeout: float = 60.0):
        self.executable, self.width, self.height = executable, width, height
        self.javascript, self.timeout = javascript, timeout
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        self._id = 0
        self._buf = b""
        self._events: list[dict] = []

    def __enter__(self) -> Chromium:
        self._profile = tempfile.mkdtemp(prefix="fxcompress-chromium-")
        # a file, not a pipe nobody reads: Chromium's log lines would fill a pipe and block it
        self._log = open(Path(self._profile) / "stderr.log", "wb")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends move above fd 9 first: "3<&r 4>&w" would clobber an end at 3 or 4
        # (bash, not dash, redirects descriptors above 9)
        to_chrome_r, from_chrome_w = (_above(to_chrome_r), _above(from_chrome_w))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"]
        # the protocol pipes must be fds 3 (commands in) and 4 (responses out) in the child
        self._proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}',
             self.executable, *args],
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.send("Target.attachToTarget", targetId=target,
                                      flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable", session=True)
            self.send("Emulation.setDeviceMetricsOverride", session=True, width=self.width,
                      height=self.height, deviceScaleFactor=1, mobile=False)
            if not self.javascript:
                self.send("Emulation.setScriptExecutionDisabled", session=True, value=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._proc.poll() is None:
                try:
                    self.send("Browser.close", timeout=5)
                except Exception:
                    pass
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    # --------------------------------------------------------------------- protocol

    def send(self, method: str, *, session: bool = False, timeout: float | None = None,
             **params: Any) -> dict:
        """Send one command and wait for its result (events that arrive meanwhile are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        want = self._id
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for m in self._read(deadline):
                if m.get("id") == want:
                    if "error" in m:
                        raise BrowserError(f"{method}: {m['error']}")
                    return m.get("result", {})
                self._event(m)

    def _read(self, deadline: float) -> list[dict]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    self._log.flush()
                    err = (Path(self._profile) / "stderr.log").read_bytes()[-2000:]
                    raise BrowserError(f"Chromium closed the pipe: {err.decode(errors='replace')}")
                self._buf += chunk
        *msgs, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in msgs if m]

    def _event(self, m: dict) -> None:
        self._events.append(m)
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.console_errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))

    def _wait_event(self, method: str, since: int = 0, timeout: float | None = None) -> dict:
        """The first ``method`` event from index ``since`` of the events kept, waiting for it."""
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = since
        while True:
            for m in self._events[seen:]:
                if m.get("method") == method:
                    return m
            seen = len(self._events)
            for m in self._read(deadline):
                self._event(m)

    # --------------------------------------------------------------------- page

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        since = len(self._events)  # the load event may arrive before navigate's reply
        result = self.send("Page.navigate", session=True, url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self._wait_event("Page.loadEventFired", since)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (works with page scripts off)."""
        r = self.send("Runtime.evaluate", session=True, expression=expression,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"evaluate failed: {r['exceptionDetails'].get('text')}")
        return r.get("result", {}).get("value")

    def screenshot(self, path: str | os.PathLike, *, full_page: bool = False,
                   clip: dict | None = None) -> Path:
        """PNG of the viewport, the whole page, or ``clip`` ({x, y, width, height}, CSS px)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, "
                                 "document.documentElement.scrollHeight]")
            clip = {"x": 0, "y": 0, "width": size[0], "height": size[1]}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", session=True, **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
