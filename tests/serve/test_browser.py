"""`liveditor serve` driven by a real browser (headless Chromium through Playwright).

Without Chromium, Playwright or Gradio the test skips and says why; with LIVEDITOR_REQUIRE_BROWSER=1
(set by .ci/run, which installs them) a missing piece fails it instead.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from liveditor.data.video_io import read_video
from liveditor.demo import example_input_path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL_HOST = "127.0.0.1"


def _missing_piece() -> str | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return "no Chromium on this machine (Debian: apt-get install chromium)"
    for module, extra in (("playwright", "playwright"), ("gradio", "liveditor[web]")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install {extra})"
    return None


@pytest.fixture(scope="module")
def chromium():
    reason = _missing_piece()
    if reason is not None:
        if os.environ.get("LIVEDITOR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LIVEDITOR_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "liveditor", "serve", "--port", str(port), "--device", "cpu",
                                    "--max-seconds", "10"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{LOCAL_HOST}:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, log
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    # Stopping the server removed every upload, edit and Gradio copy.
    assert not list(Path(env["TMPDIR"]).glob("liveditor-serve-*")), log.read_text()[-2000:]


def _video_state(page, selector: str) -> dict:
    """Play the page's video element and report what the browser decoded."""
    return page.evaluate(
        """async (selector) => {
            const v = document.querySelector(selector);
            v.muted = true;
            try { await v.play(); } catch (e) { return {error: String(e), code: v.error && v.error.code}; }
            const start = performance.now();
            while (v.currentTime === 0 && performance.now() - start < 10000) {
                await new Promise(r => setTimeout(r, 100));
            }
            return {src: v.currentSrc, width: v.videoWidth, height: v.videoHeight, time: v.currentTime,
                    code: v.error && v.error.code};
        }""",
        selector,
    )


def _set_slider(page, selector: str, value: str) -> None:
    """Type a value into a Gradio slider's number box until the slider holds it for a while (a
    page still starting up may put the default back)."""
    box, slider = page.locator(f"{selector} input[type=number]"), page.locator(f"{selector} input[type=range]")
    for _ in range(40):
        if slider.input_value() != value:
            box.fill(value)
            box.press("Enter")
        page.wait_for_timeout(500)
        if slider.input_value() == value and box.input_value() == value:
            page.wait_for_timeout(500)
            if slider.input_value() == value:
                return
    raise AssertionError(f"{selector} did not keep the value {value}")


def _start_edit(page, url: str, steps: str) -> None:
    page.goto(url)
    page.locator("#input-video input[type=file]").set_input_files(str(example_input_path()))
    page.locator("#input-preview video").wait_for(timeout=60_000)  # the upload was checked
    page.locator("#instruction textarea").fill("make the purple circle red")
    page.get_by_text("Advanced").click()
    # ISA, so that the Explain tab has a routing to show (the bundled model's default is dense).
    page.locator("#attention").get_by_text("isa", exact=True).click()
    _set_slider(page, "#steps", steps)
    page.locator("#edit-button").click()


def test_edit_in_the_browser(server, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    url, log = server
    foreign = []

    def guard(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host == LOCAL_HOST:
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a video\n")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1300},
        )
        try:
            # Every request of the context's pages goes through the guard.
            context.route("**/*", guard)
            context.on("page", lambda new: new.on("websocket", lambda ws: foreign.append(ws.url)
                                                   if urlparse(ws.url).hostname != LOCAL_HOST else None))
            page = context.new_page()
            page.goto(url)

            # A text file: a clear message in the page, and the server keeps serving.
            page.locator("#input-video input[type=file]").set_input_files(str(text_file))
            page.locator("#instruction textarea").fill("make the purple circle red")
            page.locator("#edit-button").click()
            page.get_by_text("notes.txt has unsupported extension '.txt'").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

            # Two visitors: the second waits in the queue, with its position shown, while the first edits.
            # (Each visitor fills in the page and presses Edit before the other page loads: loading a
            # second Gradio page in the same browser resets the sliders of the first.)
            page = context.new_page()
            _start_edit(page, url, steps="4")
            page.get_by_text(re.compile(r"processing|denoising")).first.wait_for(timeout=60_000)
            second = context.new_page()
            _start_edit(second, url, steps="2")
            queued = second.get_by_text(re.compile(r"queue: 1/\d+")).first
            queued.wait_for(timeout=30_000)
            page.locator("#output-video video").wait_for(timeout=240_000)
            page.locator("#edit-report").get_by_text("16 frames, 4 steps").wait_for(timeout=30_000)
            state = _video_state(page, "#output-video video")
            page.screenshot(path=str(tmp_path / "edited.png"), full_page=True)

            second.locator("#edit-report").get_by_text("16 frames, 2 steps").wait_for(timeout=240_000)
            second.get_by_role("tab", name="Explain").click()
            second.get_by_text("of dense attention's FLOPs").wait_for(timeout=30_000)
            pictures = second.locator("#explain-gallery img").count()
            second.screenshot(path=str(tmp_path / "explain.png"), full_page=True)

            # Cancel stops a long edit after the running step, and the next edit runs.
            _start_edit(page, url, steps="60")
            # Pressed once the first step is reported, the server's edit is under way. (Pressed earlier,
            # Gradio may drop the event before it reaches the server: nothing to stop, nothing logged.)
            page.get_by_text(re.compile(r"denoising")).first.wait_for(timeout=120_000)
            page.locator("#cancel-button").click()
            deadline = time.monotonic() + 120
            while "edit cancelled after step" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            _start_edit(page, url, steps="1")
            page.locator("#edit-report").get_by_text("16 frames, 1 steps").wait_for(timeout=240_000)
        except Exception:
            for i, open_page in enumerate(context.pages):  # what the pages showed, for the failure report
                open_page.screenshot(path=str(tmp_path / f"failure-{i}.png"), full_page=True)
            raise
        finally:
            context.close()

    assert not foreign, f"the page asked hosts other than {LOCAL_HOST}: {foreign}"
    # The browser decoded and played the H.264 mp4 the server wrote.
    assert state.get("code") is None and state["width"] == 64 and state["height"] == 64, state
    assert state["time"] > 0, state
    assert urlparse(state["src"]).hostname == LOCAL_HOST
    download = tmp_path / "played.mp4"
    with urllib.request.urlopen(state["src"], timeout=30) as response:
        download.write_bytes(response.read())
    assert read_video(download).num_frames == read_video(example_input_path()).num_frames == 16
    assert pictures == 16  # one picture per input frame
    cancelled = re.findall(r"edit cancelled after step (\d+) of 60", log.read_text())
    assert len(cancelled) == 1 and 1 <= int(cancelled[0]) < 60, log.read_text()[-2000:]
    assert (tmp_path / "edited.png").stat().st_size > 0 and (tmp_path / "explain.png").stat().st_size > 0
