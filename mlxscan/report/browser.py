"""Open a page in headless Chromium and report what a reader would see: console errors and a screenshot.

Chromium is driven through the DevTools protocol over --remote-debugging-pipe (file descriptors 3 and 4,
messages ended by NUL), with the standard library alone. `--enable-logging` would print console messages
without their level and without failed resource loads; the protocol gives both (Runtime and Log domains).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MlxscanError

# Flags measured to work here (root, no display, no network); a new empty profile each run.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe")
TIMEOUT_S = 60.0
# Every image, decoded (a data URI that does not decode is a broken figure even if nothing is logged).
_BROKEN_IMAGES_JS = ("Promise.all(Array.from(document.images).map(i => i.decode().then(() => 0, () => 1)))"
                     ".then(r => r.reduce((a, b) => a + b, 0))")


def find_chromium() -> str | None:
    """$MLXSCAN_CHROMIUM, else `chromium` on PATH (Debian's package), else None."""
    return os.environ.get("MLXSCAN_CHROMIUM") or shutil.which("chromium")


@dataclass(frozen=True)
class PageCheck:
    url: str
    console_errors: tuple[str, ...]  # console.error/assert calls, uncaught exceptions, failed loads
    n_images: int
    broken_images: int  # images that failed to decode
    screenshot: bytes  # PNG of the viewport
    content_size: tuple[int, int]  # (width, height) of the whole page in CSS pixels


class _DevTools:
    """One Chromium process and its protocol pipe."""

    def __init__(self, executable: str, profile: str, stderr):
        to_child, self._to_chromium = os.pipe()
        self._from_chromium, from_child = os.pipe()
        # Move the child's ends above 10 so putting them on 3 and 4 cannot overwrite one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child, from_child)]
        os.close(to_child)
        os.close(from_child)

        def on_fds_3_and_4():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        try:
            self.process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                            pass_fds=(3, 4), preexec_fn=on_fds_3_and_4)
        finally:
            for fd in high:
                os.close(fd)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_chromium], [], [], remaining)[0]:
                raise MlxscanError(f"chromium did not answer within {TIMEOUT_S:.0f} s")
            chunk = os.read(self._from_chromium, 1 << 20)
            if not chunk:
                raise MlxscanError("chromium closed its DevTools pipe (it exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, deadline: float = 0.0):
        """Send one command and wait for its answer; events that arrive meanwhile are kept in self.events."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        except BrokenPipeError as error:  # click would take an EPIPE for a closed stdout and exit silently
            raise MlxscanError("chromium exited before it took a DevTools command") from error
        while True:
            reply = self._read_message(deadline or time.monotonic() + TIMEOUT_S)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise MlxscanError(f"chromium refused {method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, deadline: float) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", deadline=time.monotonic() + 10)
        except (MlxscanError, OSError):
            pass  # it may already be gone; the process is reaped below either way
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chromium)
        os.close(self._from_chromium)


def _console_errors(events: list[dict]) -> tuple[str, ...]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console." + params["type"] + ": " + " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".strip())
    return tuple(errors)


def check_page(page: Path, *, width: int = 1280, height: int = 900, executable: str | None = None) -> PageCheck:
    """Load a local HTML file in headless Chromium at width x height; its console errors and a screenshot."""
    executable = executable or find_chromium()
    if not executable:
        raise MlxscanError("chromium not found; install Debian's package (apt-get install chromium) or set MLXSCAN_CHROMIUM")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="mlxscan-chromium-") as profile, \
            tempfile.TemporaryFile() as stderr:
        browser = _DevTools(executable, profile, stderr)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            target = browser.call("Target.createTarget", {"url": "about:blank"}, deadline=deadline)["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   deadline=deadline)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                browser.call(f"{domain}.enable", session=session, deadline=deadline)
            browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                         "deviceScaleFactor": 1, "mobile": False}, session=session, deadline=deadline)
            browser.events.clear()  # what about:blank did is not the page's
            browser.call("Page.navigate", {"url": url}, session=session, deadline=deadline)
            browser.wait_for("Page.loadEventFired", deadline)
            broken = browser.call("Runtime.evaluate", {"expression": _BROKEN_IMAGES_JS, "awaitPromise": True,
                                  "returnByValue": True}, session=session, deadline=deadline)["result"]["value"]
            n_images = browser.call("Runtime.evaluate", {"expression": "document.images.length", "returnByValue": True},
                                    session=session, deadline=deadline)["result"]["value"]
            metrics = browser.call("Page.getLayoutMetrics", session=session, deadline=deadline)["cssContentSize"]
            shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session, deadline=deadline)
        except MlxscanError as error:
            stderr.seek(0)
            tail = [line for line in stderr.read().decode(errors="replace").splitlines() if line.strip()][-2:]
            status = browser.process.poll()
            raise MlxscanError(f"{error}; {executable}" + (f" exit status {status}" if status is not None else "")
                               + (f"; its last words: {' | '.join(tail)}" if tail else "")) from error
        finally:
            browser.close()
    return PageCheck(url, _console_errors(browser.events), int(n_images), int(broken), base64.b64decode(shot["data"]),
                     (round(metrics["width"]), round(metrics["height"])))
