"""`pocketdit demo`: the page's generate function on a tiny elastic model, the command's one-line errors, and the
page itself in a real headless Chromium (prompt typed, width and seed set, button clicked, image shown).

The browser is Debian's `chromium` (`apt-get install chromium`; .ci/run installs it), driven over the Chrome
DevTools Protocol on a pipe (--remote-debugging-pipe: JSON messages ending in NUL on the browser's fds 3 and 4),
so no driver, websocket library or browser download is needed. Without chromium the browser test skips."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pocketdit.cli import main
from pocketdit.demo import make_generate, model_widths
from pocketdit.pipeline import PocketDiTPipeline

TINY_ELASTIC_TRAIN = [
    "--model.preset", "nano", "--model.num_kv_heads", "4", "--model.elastic_widths", "[0.5, 1.0]",
    "--method.name", "elastic", "--data.name", "shapes", "--data.resolution", "16", "--data.length", "16",
    "--data.batch_size", "4", "--text.max_length", "8", "--train.steps", "1", "--train.checkpoint_every", "1",
    "--train.sample_every", "0", "--train.progress", "false", "--train.num_threads", "1",
    "--autoencoder", "pixel", "--model.in_channels", "3",
]
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 16 px nano supernet (widths 0.5 and 1) trained for one step: a model directory for -m."""
    run = tmp_path_factory.mktemp("demo") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY_ELASTIC_TRAIN, "--train.output_dir", str(run)]) == 0
    finally:
        torch.set_num_threads(n)
    return run


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("pocketdit: error:")]


def test_generate_function(tiny_run, one_thread):
    gr = pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    from pocketdit.demo import build_demo
    from pocketdit.elastic import select_width

    pipe = PocketDiTPipeline.from_pretrained(tiny_run, device="cpu")
    supernet = pipe.transformer
    demo = build_demo(pipe)
    assert isinstance(demo, gr.Blocks)
    assert model_widths(pipe) == [1.0, 0.5]

    for width in (1.0, 0.5):
        image = demo.generate(PROMPT, width, 2, 3)
        assert image.size == (256, 256)  # 16 px, enlarged 16x to the display side
        pipe.transformer = select_width(supernet, width)
        want = pipe(PROMPT, num_inference_steps=2, seed=[3]).images[0].resize((256, 256), Image.NEAREST)
        pipe.transformer = supernet
        assert np.array_equal(np.asarray(image), np.asarray(want)), width
    assert pipe.transformer is supernet  # generate puts the supernet back
    assert demo.generate("", 1.0, 1, 0).size == (256, 256)  # an empty prompt: an unconditional sample
    assert not np.array_equal(np.asarray(demo.generate(PROMPT, 1.0, 2, 3)), np.asarray(demo.generate(PROMPT, 1.0, 2, 4)))
    for bad, match in (((PROMPT, 0.25, 2, 3), "not one of 1, 0.5"), ((PROMPT, 1.0, 0, 3), "steps"),
                       ((PROMPT, 1.0, 2, -1), "seed")):
        with pytest.raises(ValueError, match=match):
            demo.generate(*bad)


def test_command_errors_are_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    assert main(["demo", "--share"]) == 2  # no public tunnels
    assert "unrecognized arguments: --share" in _error_lines(capsys)[0]
    assert main(["demo", "--port", "65536"]) == 2
    assert "expected a port from 0" in _error_lines(capsys)[0]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "gradio", None)  # what an install without the extra looks like to importlib
        assert main(["demo", "--port", "0"]) == 2
        (line,) = _error_lines(capsys)
        assert "needs gradio" in line and "pip install 'pocketdit[demo]'" in line
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    assert main(["demo", "-m", str(tmp_path / "no-such-model"), "--port", "0"]) == 2
    (line,) = _error_lines(capsys)
    assert "pipeline not found" in line
    with socket.socket() as taken:  # a port another server has: refused before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["demo", "-m", str(tiny_run), "--port", str(taken.getsockname()[1])]) == 2
        (line,) = _error_lines(capsys)
        assert "cannot serve on 127.0.0.1" in line and "another server" in line
    assert main(["demo", "--host", "203.0.113.7", "--port", "0"]) == 2  # TEST-NET-3: not this machine's address
    assert "cannot serve on 203.0.113.7:0" in _error_lines(capsys)[0]


# ----------------------------------------------------------------------------------------------------
# A headless Chromium driven over the DevTools protocol on a pipe
# ----------------------------------------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-extensions", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--disable-features=Translate,MediaRouter", "--mute-audio", "--hide-scrollbars",
    "--remote-debugging-pipe",
]
# Puts the two pipe ends on fds 3 (commands in) and 4 (replies out), where --remote-debugging-pipe wants them.
_ON_FDS_3_AND_4 = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                   "os.execv(sys.argv[3], sys.argv[3:])")


def _high_fd(fd: int) -> int:
    """The same pipe end on an fd >= 10, so that putting it on 3 or 4 cannot overwrite the other one."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """A headless Chromium with one page; `send` is one DevTools command and its reply."""

    def __init__(self, executable: str, profile: Path, width: int = 1024, height: int = 640):
        to_browser, self._write = (_high_fd(fd) for fd in os.pipe())
        self._read, from_browser = (_high_fd(fd) for fd in os.pipe())
        self.log = profile / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ON_FDS_3_AND_4, str(to_browser), str(from_browser), executable,
                 *CHROMIUM_FLAGS, f"--user-data-dir={profile / 'profile'}", f"--window-size={width},{height}",
                 "about:blank"],
                pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # its own process group: close() can end the renderers with it
            )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        self.session = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except Exception:
            self.close()
            raise

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:  # anything else is an event: not needed here
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} in {timeout:g} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.log.read_text(errors='replace')[-2000:]})")
            self._buffer += chunk

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = ""):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never showed {what or expression} in {timeout:g} s")

    def click(self, selector: str) -> None:
        """A real left click (mouse pressed and released) at the middle of the element."""
        x, y = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def type_into(self, selector: str, text: str) -> None:
        """Focus an input, select what it holds, and type `text` over it (input events, as a keyboard would)."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._write)
        os.close(self._read)


def start_demo_server(argv: list[str], cwd: Path, timeout: float = 90.0):
    """`pocketdit demo ARGV` in a subprocess: (process, page URL) once it says where it serves."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(cwd / "gradio"))
    proc = subprocess.Popen([sys.executable, "-m", "pocketdit.cli", "demo", *argv], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        output.append(line)
        found = re.match(r"pocketdit demo: (http://\S+) ", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"`pocketdit demo` did not start (exit {proc.returncode}):\n{''.join(output)}")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drive_demo_page(browser: Browser, url: str, prompt: str, width: str | None = None, seed: int | None = None,
                    timeout: float = 60.0) -> dict:
    """Open the page, type the prompt (and pick the width, type the seed), click Generate and wait for the image.
    Returns the shown image's natural size and address."""
    browser.send("Page.navigate", {"url": url})
    browser.wait_for("!!document.querySelector('#prompt textarea') && !!document.querySelector('button#generate')",
                     timeout, "the prompt box and the Generate button")
    browser.click("#prompt textarea")
    browser.type_into("#prompt textarea", prompt)
    browser.wait_for(f"document.querySelector('#prompt textarea').value === {json.dumps(prompt)}", 10, "the prompt")
    if width is not None:
        browser.click(f"#model-width input[type=radio][value={json.dumps(width)}]")
        browser.wait_for(f"document.querySelector('#model-width input:checked')?.value === {json.dumps(width)}", 10,
                         f"width {width} picked")
    if seed is not None:
        browser.type_into("#seed input", str(seed))
        browser.wait_for(f"document.querySelector('#seed input').value === {json.dumps(str(seed))}", 10, "the seed")
    browser.click("button#generate")
    shown = browser.wait_for("""(() => {
        const i = document.querySelector('#output img');
        return i && i.complete && i.naturalWidth > 0 ? {width: i.naturalWidth, height: i.naturalHeight, src: i.src}
                                                     : null;
    })()""", timeout, "an image")
    time.sleep(0.3)  # let the page settle (progress overlay gone) before a screenshot
    return shown


def _fetch(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy
    with opener.open(url, timeout=30) as response:
        return response.read()


@pytest.fixture
def chromium() -> str:
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


def test_page_in_headless_chromium(chromium, tiny_run, tmp_path, one_thread):
    server, url = start_demo_server(["-m", str(tiny_run), "--port", "0", "--threads", "1", "--device", "cpu"],
                                    tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        browser = Browser(chromium, tmp_path)
        try:
            shown = drive_demo_page(browser, url, PROMPT, width="0.5", seed=7)
            screenshot = browser.screenshot()
        finally:
            browser.close()
        png = _fetch(shown["src"])
    finally:
        stop(server)

    assert (shown["width"], shown["height"]) == (256, 256)
    pipe = PocketDiTPipeline.from_pretrained(tiny_run, device="cpu")
    want = make_generate(pipe)(PROMPT, 0.5, pipe.default_steps, 7)  # the page's prompt, width, steps and seed
    assert np.array_equal(np.asarray(Image.open(BytesIO(png)).convert("RGB")), np.asarray(want))
    (tmp_path / "demo.png").write_bytes(screenshot)
    assert Image.open(tmp_path / "demo.png").size == (1024, 640)
