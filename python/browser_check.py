#!/usr/bin/env python3
"""Checks the rendered report in a real, headless Chromium and prints what it found as JSON.

Used by tests/browser.rs (which judges the findings) and by `just report-shot` (which only
wants the screenshot). Python 3.11 standard library only.

    python3 python/browser_check.py artifacts/report/index.html [--screenshot PATH]
        [--chromium PATH] [--timeout SECONDS]

It drives Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`: the browser
reads NUL-terminated JSON commands on fd 3 and writes NUL-terminated responses and events on
fd 4), so no debugging port is opened. It loads the page at a desktop width (1280 px) and
collects:

  * console errors: console.error/console.assert, uncaught exceptions, error log entries
    (which include "Failed to load resource");
  * every request whose URL is not file:, data:, about: or blob: (a report must need no network)
    and every request that failed;
  * broken images: each <img> that is not complete or has naturalWidth 0 (lazy images are made
    eager first and awaited, so an image below the fold is not counted as broken);
  * the claims table (`<table id="claims-table">`), its rows and the claim ids of its
    `<tr id="claim-...">` rows;
  * at the desktop width and at a phone's (390 px, mobile): whether the page is wider than the
    screen (documentElement.scrollWidth > width + 1; the screen's width, not innerWidth, since
    a page without <meta name="viewport"> gets a layout 980 px or more wide on a phone) and
    which elements stick out.

With --screenshot it also writes a PNG of the whole page at the desktop width.

Keeping the browser off the network: every http(s)/ws request goes to a proxy that this script
runs on a 127.0.0.1 port; it notes the request's first line and hangs up, forwarding nothing
(`<-loopback>` sends even loopback URLs there). --host-resolver-rules maps every host name to
NOTFOUND, so no DNS query is made either (the proxy is an IP literal and needs none); QUIC,
background networking, component updates, network time, sync, extensions and non-proxied
WebRTC UDP are off. Chromium 156 still tries two Google services of its own (an on-demand
component at update.googleapis.com, and accounts.google.com); they end at the proxy and are
listed under "stopped_at_proxy". Traced with strace: the only connect() to anything but
127.0.0.1 is Chromium's IPv6 probe, a UDP socket "connected" to a public address to learn the
route, then closed; connecting a UDP socket sends no packet.

Exit status: 0 when the browser ran (the findings, good or bad, are in the JSON; the caller
judges them), 2 when Chromium is not installed, 1 on any other error (a timeout, a browser that
died, a page that does not exist), with the reason on stderr. Chromium is always stopped and its
temporary profile removed, also on errors.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
# Time for late console errors after the page and its images have loaded.
SETTLE_SECONDS = 0.3


class CheckError(Exception):
    """A failure to run the check (not a finding about the page)."""


class ChromiumMissing(CheckError):
    pass


def find_chromium(explicit: str | None) -> str:
    """The Chromium executable: --chromium, then $REPRO_CHROMIUM, then chromium on PATH."""
    candidates = [explicit] if explicit else []
    if not explicit and os.environ.get("REPRO_CHROMIUM"):
        candidates.append(os.environ["REPRO_CHROMIUM"])
    if not candidates:
        candidates = [shutil.which(name) for name in ("chromium", "chromium-browser")]
        candidates.append("/usr/bin/chromium")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    tried = ", ".join(c for c in candidates if c) or "chromium on PATH"
    raise ChromiumMissing(
        f"chromium is not installed (tried {tried}); install it with `apt-get install chromium` "
        "or name it with --chromium / $REPRO_CHROMIUM"
    )


def chromium_flags(profile_dir: str, proxy_port: int) -> list[str]:
    flags = [
        "--headless",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--mute-audio",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile_dir}",
        # Off the network: see the header.
        f"--proxy-server=127.0.0.1:{proxy_port}",
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        "--disable-features=NetworkTimeServiceQuerying",
    ]
    if os.geteuid() == 0:
        # Chromium refuses to start as root with its sandbox on.
        flags.append("--no-sandbox")
    return flags


class ProxySink:
    """The proxy Chromium is given: a 127.0.0.1 port that reads the first line of each request
    (`GET http://host/path HTTP/1.1`, `CONNECT host:443 HTTP/1.1`), records it and hangs up
    without answering or forwarding anything."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.requests: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.1)
            if not ready:
                continue
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(1)
                head = b""
                try:
                    while b"\r\n" not in head and len(head) < 4096:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                except OSError:
                    pass
            self.requests.append(head.split(b"\r\n")[0].decode("latin-1") or "(nothing sent)")

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        self.listener.close()


class Browser:
    """One Chromium process and its DevTools pipe; every wait ends at `deadline`."""

    def __init__(self, executable: str, timeout: float):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.profile_dir = tempfile.mkdtemp(prefix="browser_check-profile-")
        self.sink = ProxySink()
        self.flags = chromium_flags(self.profile_dir, self.sink.port)
        self.stderr_file = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict] = []
        cmd_read, self.cmd_write = os.pipe()
        self.resp_read, resp_write = os.pipe()

        def child_fds() -> None:
            # The child must see the command pipe as fd 3 and the response pipe as fd 4; copy
            # both to free fds above 4 first so that neither dup2 overwrites the other.
            high_cmd = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 5)
            high_resp = fcntl.fcntl(resp_write, fcntl.F_DUPFD, 5)
            os.dup2(high_cmd, 3)
            os.dup2(high_resp, 4)

        try:
            self.proc = subprocess.Popen(
                [executable, *self.flags, "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=self.stderr_file,
                stderr=self.stderr_file,
                # close_fds would close the fds 3 and 4 made in child_fds; only inheritable fds
                # survive exec, and Python's own are not inheritable.
                close_fds=False,
                preexec_fn=child_fds,
                start_new_session=True,
            )
        finally:
            os.close(cmd_read)
            os.close(resp_write)
        # Only now: a thread running while preexec_fn runs could deadlock the child.
        self.sink.start()

    # -- the pipe ------------------------------------------------------------------------

    def stderr_tail(self) -> str:
        self.stderr_file.seek(0)
        lines = self.stderr_file.read().decode("utf-8", "replace").strip().splitlines()
        return "\n".join(lines[-15:])

    def remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckError(f"timed out ({self.timeout:g} s) waiting for {what}")
        return left

    def read_message(self, what: str) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.resp_read], [], [], self.remaining(what))
            if not ready:
                continue
            chunk = os.read(self.resp_read, 1 << 20)
            if not chunk:
                code = self.proc.poll() if self.proc else None
                raise CheckError(
                    f"chromium closed its DevTools pipe while waiting for {what} "
                    f"(exit status {code}); its last output:\n{self.stderr_tail()}"
                )
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Sends a command and returns its result; events read meanwhile are queued."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            _, ready, _ = select.select([], [self.cmd_write], [], self.remaining(method))
            if ready:
                data = data[os.write(self.cmd_write, data) :]
        while True:
            reply = self.read_message(method)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise CheckError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        """Waits for an event (returns it; earlier events stay queued)."""
        for event in self.events:
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        while True:
            event = self.read_message(method)
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event

    def drain(self, seconds: float) -> None:
        """Reads events for `seconds` (bounded by the deadline)."""
        until = min(time.monotonic() + seconds, self.deadline)
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.resp_read], [], [], left)
            if ready:
                chunk = os.read(self.resp_read, 1 << 20)
                if not chunk:
                    return
                self.buffer += chunk
                while b"\0" in self.buffer:
                    raw, self.buffer = self.buffer.split(b"\0", 1)
                    self.events.append(json.loads(raw))

    # -- shutting down -------------------------------------------------------------------

    def close(self) -> None:
        """Stops Chromium (politely, then by force) and removes its profile; never raises."""
        if self.proc and self.proc.poll() is None:
            try:
                self.deadline = time.monotonic() + 3
                self.send("Browser.close")
            except (CheckError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        if self.proc:
            # Its helpers (zygote, renderer) share the session it was started in.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for fd in (self.cmd_write, self.resp_read):
            try:
                os.close(fd)
            except OSError:
                pass
        self.sink.close()
        self.stderr_file.close()
        shutil.rmtree(self.profile_dir, ignore_errors=True)


def evaluate(browser: Browser, session: str, expression: str):
    """Runs JavaScript in the page (awaiting a promise) and returns its JSON value."""
    result = browser.send(
        "Runtime.evaluate",
        {"expression": expression, "awaitPromise": True, "returnByValue": True},
        session,
    )
    if "exceptionDetails" in result:
        details = result["exceptionDetails"]
        text = details.get("exception", {}).get("description") or details.get("text")
        raise CheckError(f"the check's own JavaScript failed: {text}")
    return result["result"].get("value")


IMAGES_JS = """
(async () => {
  const images = [...document.images];
  for (const img of images) if (img.loading === 'lazy') img.loading = 'eager';
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done, {once: true});
    img.addEventListener('error', done, {once: true});
  })));
  return images.map(img => ({
    src: img.getAttribute('src'), complete: img.complete, naturalWidth: img.naturalWidth,
  }));
})()
"""

CLAIMS_JS = """
(() => {
  const table = document.getElementById('claims-table');
  const claimRows = [...document.querySelectorAll('tr[id^="claim-"]')];
  const outside = claimRows.filter(tr => !table || !table.contains(tr)).map(tr => tr.id);
  if (!table || table.tagName !== 'TABLE')
    return {found: false, tag: table ? table.tagName.toLowerCase() : null, rows: 0, claim_ids: [],
            claim_rows_outside: outside};
  // Data rows: those with at least one <td> (a header row has only <th>).
  const rows = [...table.querySelectorAll('tr')].filter(tr => tr.querySelector('td'));
  const ids = rows.filter(tr => tr.id.startsWith('claim-')).map(tr => tr.id.slice(6));
  return {found: true, tag: 'table', rows: rows.length, claim_ids: ids,
          claim_rows_outside: outside};
})()
"""

# Formatted with the device's width in CSS px. The page must fit that width: a page without
# <meta name="viewport" content="width=device-width"> is laid out 980 px (or more) wide on a
# phone, so innerWidth is no limit to compare with.
OVERFLOW_JS = """
(async () => {
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const root = document.documentElement;
  const limit = %d + 1;
  // The outermost elements that reach past the right edge (their parent does not), leaving
  // out those inside a box that clips or scrolls sideways (they cannot widen the page).
  const clipped = el => {
    for (let up = el.parentElement; up && up !== document.body; up = up.parentElement)
      if (getComputedStyle(up).overflowX !== 'visible') return true;
    return false;
  };
  const sticking = [];
  const headings = [...document.querySelectorAll('h1, h2, h3, h4')];
  for (const el of document.body ? document.body.querySelectorAll('*') : []) {
    const right = el.getBoundingClientRect().right + window.scrollX;
    if (right <= limit || clipped(el)) continue;
    const parent = el.parentElement;
    if (parent && parent !== document.body &&
        parent.getBoundingClientRect().right + window.scrollX > limit) continue;
    let name = el.tagName.toLowerCase();
    if (el.id) name += '#' + el.id;
    if (el.classList.length) name += '.' + [...el.classList].join('.');
    // The heading it comes under, to find it in the report.
    const heading = headings.filter(h =>
      h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING).pop();
    sticking.push({element: name, right: Math.round(right),
                   under: heading ? heading.textContent.trim().slice(0, 80) : null});
    if (sticking.length >= 20) break;
  }
  return {
    inner_width: window.innerWidth,
    scroll_width: root.scrollWidth,
    viewport_meta: !!document.querySelector('meta[name="viewport"]'),
    overflows: root.scrollWidth > limit,
    sticking_out: sticking,
  };
})()
"""


def console_errors(events: list[dict], session: str) -> list[dict]:
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            text = " ".join(
                str(a.get("value", a.get("description", a.get("type")))) for a in args
            )
            frames = params.get("stackTrace", {}).get("callFrames", [])
            where = frames[0] if frames else {}
            errors.append(
                {
                    "source": f"console.{params['type']}",
                    "text": text,
                    "url": where.get("url"),
                    "line": where.get("lineNumber"),
                }
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            errors.append(
                {
                    "source": "exception",
                    "text": text,
                    "url": details.get("url"),
                    "line": details.get("lineNumber"),
                }
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(
                {
                    "source": f"log.{entry.get('source')}",
                    "text": entry.get("text"),
                    "url": entry.get("url"),
                    "line": entry.get("lineNumber"),
                }
            )
    return errors


def network_findings(events: list[dict], session: str) -> tuple[list[dict], list[dict]]:
    """(requests that are not local, requests that failed), each with its outcome."""
    urls: dict[str, str] = {}
    outcome: dict[str, str] = {}
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        rid = params.get("requestId")
        if method == "Network.requestWillBeSent":
            urls.setdefault(rid, params["request"]["url"])
        elif method == "Network.responseReceived":
            outcome[rid] = f"HTTP {params['response'].get('status')}"
        elif method == "Network.loadingFailed":
            reason = params.get("errorText") or "failed"
            if params.get("blockedReason"):
                reason += f" (blocked: {params['blockedReason']})"
            outcome[rid] = reason
    remote = [
        {"url": url, "outcome": outcome.get(rid, "no response")}
        for rid, url in urls.items()
        if not url.startswith(LOCAL_SCHEMES)
    ]
    failed = [
        {"url": urls.get(rid, "?"), "error": reason}
        for rid, reason in outcome.items()
        if not reason.startswith("HTTP ")
    ]
    return remote, failed


def take_screenshot(browser: Browser, session: str, path: Path) -> dict:
    """Writes a PNG of the whole page (not just the viewport) to `path`."""
    metrics = browser.send("Page.getLayoutMetrics", {}, session)
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    picture = browser.send(
        "Page.captureScreenshot",
        {"format": "png", "captureBeyondViewport": True, "clip": clip},
        session,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(picture["data"]))
    return {"path": str(path), "width": round(size["width"]), "height": round(size["height"])}


def check(page: Path, executable: str, screenshot: Path | None, timeout: float) -> dict:
    started = time.monotonic()
    browser = Browser(executable, timeout)
    try:
        version = browser.send("Browser.getVersion").get("product")
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.send(f"{domain}.enable", {}, session)
        browser.send("Emulation.setDeviceMetricsOverride", DESKTOP, session)

        url = page.resolve().as_uri()
        # Only what the report's own load brings counts (and no early load event of about:blank).
        browser.events.clear()
        navigation = browser.send("Page.navigate", {"url": url}, session)
        if navigation.get("errorText"):
            raise CheckError(f"loading {url} failed: {navigation['errorText']}")
        browser.wait_for("Page.loadEventFired", session)
        images = evaluate(browser, session, IMAGES_JS)
        claims = evaluate(browser, session, CLAIMS_JS)
        desktop = evaluate(browser, session, OVERFLOW_JS % DESKTOP["width"])
        desktop["width"] = DESKTOP["width"]
        browser.drain(SETTLE_SECONDS)

        shot = take_screenshot(browser, session, screenshot) if screenshot else None

        browser.send("Emulation.setDeviceMetricsOverride", PHONE, session)
        phone = evaluate(browser, session, OVERFLOW_JS % PHONE["width"])
        phone["width"] = PHONE["width"]
        browser.drain(SETTLE_SECONDS)

        errors = console_errors(browser.events, session)
        remote, failed = network_findings(browser.events, session)
    finally:
        flags = browser.flags
        browser.close()
    stopped = browser.sink.requests

    broken = [img for img in images if not img["complete"] or img["naturalWidth"] == 0]
    problems = [f"console error ({e['source']}): {e['text']}" for e in errors]
    problems += [f"request to {r['url']} ({r['outcome']})" for r in remote]
    problems += [f"broken image {img['src']}" for img in broken]
    if not claims["found"]:
        problems.append(
            f'id="claims-table" is on a <{claims["tag"]}>, not a <table>'
            if claims["tag"]
            else 'no <table id="claims-table"> in the page'
        )
    elif claims["rows"] == 0:
        problems.append("the claims table has no rows with <td> cells")
    elif not claims["claim_ids"]:
        problems.append('no row of the claims table has an id="claim-<ID>"')
    if claims["claim_rows_outside"]:
        problems.append(
            "claim rows outside the claims table: " + ", ".join(claims["claim_rows_outside"])
        )
    for name, layout in (("desktop", desktop), ("phone", phone)):
        if layout["overflows"]:
            sticking = ", ".join(e["element"] for e in layout["sticking_out"][:5])
            problems.append(
                f"at the {name}'s {layout['width']} px the page is {layout['scroll_width']} px "
                "wide" + (f" ({sticking} sticking out)" if sticking else "")
            )
    if not phone["viewport_meta"]:
        problems.append(
            'no <meta name="viewport">: a phone lays the page out '
            f"{phone['inner_width']} px wide and zooms out"
        )
    return {
        "page": url,
        "chromium": version,
        "flags": flags,
        "console_errors": errors,
        "network_requests": remote,
        "failed_loads": failed,
        # Every request that reached the proxy (the page's and Chromium's own background ones),
        # none of them forwarded.
        "stopped_at_proxy": stopped,
        "images": {"count": len(images), "broken": broken},
        "claims_table": {k: claims[k] for k in ("found", "tag", "rows", "claim_ids")},
        "desktop": desktop,
        "phone": phone,
        "screenshot": shot,
        # A summary in words of everything above that is wrong (the caller still judges).
        "problems": problems,
        "seconds": round(time.monotonic() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the HTML file (e.g. artifacts/report/index.html)")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG here")
    parser.add_argument(
        "--chromium", help="the Chromium executable (default: $REPRO_CHROMIUM, then chromium)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60, help="seconds for the whole check (default 60)"
    )
    args = parser.parse_args()
    try:
        executable = find_chromium(args.chromium)
        if not args.page.is_file():
            raise CheckError(f"{args.page} does not exist (render the report first)")
        findings = check(args.page, executable, args.screenshot, args.timeout)
    except ChromiumMissing as err:
        print(f"browser_check: {err}", file=sys.stderr)
        return 2
    except (CheckError, OSError) as err:
        print(f"browser_check: error: {err}", file=sys.stderr)
        return 1
    json.dump(findings, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
