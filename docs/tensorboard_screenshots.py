"""Screenshots of bnexp's TensorBoard dashboards as a person sees them, in headless Chromium.

    python docs/tensorboard_screenshots.py OUT_DIR                    # trains a small default comparison
    python docs/tensorboard_screenshots.py OUT_DIR --logdir COMPARISON_DIR
    python docs/tensorboard_screenshots.py OUT_DIR --config configs/compare/batch4_variants.yaml --steps 300

Trains a small comparison into OUT_DIR/comparison (unless --logdir names existing runs), starts
`tensorboard --logdir` on it, and saves what each dashboard opens on: OUT_DIR/timeseries.png (runs coloured
by arm, as the README says), scalars.png, custom_scalars.png, hparams_table.png and hparams_parallel.png;
and figure1.png, the custom scalars' Figure-1 charts with one seed of each arm (the README's filter).

Chromium is driven over its DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended by a
NUL byte on file descriptors 3 and 4), which needs no package beyond the standard library and lets the
script click the hparams dashboard's parallel-coordinates tab, which no URL selects. Not part of the test
suite (Chromium is not in CI): tests/test_tensorboard.py checks the event files with tensorboard's reader.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARM_COLOURS = r"([^/]+)/s\d+$"  # the README's colour grouping: one colour per arm (run names <arm>/s<seed>)
ONE_SEED = "/s0$"  # the README's run filter for the dashboards that colour run by run

# Finds an element through every shadow root (TensorBoard's dashboards are Polymer and Angular elements).
_DEEP_FIND = """
(pred) => {
  const stack = [document];
  while (stack.length) {
    const node = stack.pop();
    for (const el of node.querySelectorAll('*')) {
      if (pred(el)) return el;
      if (el.shadowRoot) stack.push(el.shadowRoot);
    }
  }
  return null;
}
"""


class Chromium:
    """A headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, width: int, height: int):
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            sys.exit("no chromium on PATH")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds_3_and_4():  # the protocol's fixed descriptors, in the child only
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False, session=True)
        self.call("Page.enable", session=True)

    def call(self, method: str, session: bool = False, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:  # events are skipped: the script waits by time and by polling the page
            while b"\0" not in self._buf:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed its pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                           session=True)
        return result.get("result", {}).get("value")

    def goto(self, url: str, settle: float) -> None:
        self.call("Page.navigate", url=url, session=True)
        time.sleep(settle)

    def act(self, text: str, action: str, settle: float) -> bool:
        """`action` ("click()" or "scrollIntoView()") on the innermost element whose own text starts with
        `text` (case-insensitive), through shadow roots."""
        found = self.evaluate(f"""(() => {{
            const el = ({_DEEP_FIND})(e => e.children.length === 0
                && (e.textContent || '').trim().toLowerCase().startsWith({json.dumps(text.lower())}));
            if (!el) return false;
            el.{action};
            return true;
        }})()""")
        time.sleep(settle)
        if not found:
            print(f"nothing on the page reads {text!r}", file=sys.stderr)
        return bool(found)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        print(path)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def train(out: Path, config: str, steps: int, sets: list[str], jobs: int) -> Path:
    comparison = out / "comparison"
    cmd = [sys.executable, "-m", "bnexp.cli", "compare", "--config", config, "--out", str(comparison),
           "--jobs", str(jobs), "--quiet", "--set", f"base.train.steps={steps}"]
    for s in sets:
        cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return comparison


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int, log: Path) -> subprocess.Popen:
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen([*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"tensorboard exited: {log.read_text()}")
        try:
            with opener.open(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as resp:
                if json.loads(resp.read()):
                    return proc
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    proc.terminate()
    sys.exit(f"tensorboard did not serve the runs: {log.read_text()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for the screenshots (created)")
    ap.add_argument("--logdir", type=Path, help="existing runs or comparison to show (nothing is trained)")
    ap.add_argument("--config", default="configs/compare/default.yaml", help="comparison to train")
    ap.add_argument("--steps", type=int, default=400, help="base.train.steps of the trained comparison")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="more compare --set overrides")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds a dashboard gets to load its data")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.logdir or train(args.out, args.config, args.steps, args.sets, args.jobs)
    port = free_port()
    tensorboard = start_tensorboard(logdir, port, args.out / "tensorboard.log")
    base = f"http://127.0.0.1:{port}/"
    chrome = Chromium(args.width, args.height)
    try:
        colours = urllib.parse.urlencode({"runColorGroup": f"regex:{ARM_COLOURS}"})
        chrome.goto(f"{base}?{colours}#timeseries", args.settle)
        chrome.screenshot(args.out / "timeseries.png")
        for view in ("scalars", "custom_scalars"):
            chrome.goto(f"{base}#{view}", args.settle)
            chrome.screenshot(args.out / f"{view}.png")
        chrome.goto(f"{base}#custom_scalars&regexInput={urllib.parse.quote(ONE_SEED, safe='')}", args.settle)
        if chrome.act("input to the nonlinearity", "scrollIntoView()", 2):
            chrome.screenshot(args.out / "figure1.png")
        chrome.goto(f"{base}#hparams", args.settle)
        chrome.screenshot(args.out / "hparams_table.png")
        if chrome.act("parallel coordinates view", "click()", args.settle / 2):
            chrome.screenshot(args.out / "hparams_parallel.png")
    finally:
        chrome.close()
        tensorboard.terminate()
        tensorboard.wait(timeout=15)


if __name__ == "__main__":
    main()
