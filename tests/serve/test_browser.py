"""`liveditor serve` driven by a real browser (headless Chromium through Playwright).

Without Chromium, Playwright or Gradio the test skips and says why; with LIVEDITOR_REQUIRE_BROWSER=1
(set by .ci/run, which installs them) a missing piece fails it instead.
"""

import os
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
    yield url, Path(env["TMPDIR"])
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


def test_edit_in_the_browser(server, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    url, server_tmp = server
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
            page = context.new_page()
            page.route("**/*", guard)
            page.on("websocket", lambda ws: foreign.append(ws.url) if urlparse(ws.url).hostname != LOCAL_HOST else None)
            page.goto(url)

            # A text file: a clear message in the page, and the server keeps serving.
            page.locator("#input-video input[type=file]").set_input_files(str(text_file))
            page.locator("#instruction textarea").fill("make the purple circle red")
            page.locator("#edit-button").click()
            page.get_by_text("notes.txt has unsupported extension '.txt'").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

            page.goto(url)
            page.locator("#input-video input[type=file]").set_input_files(str(example_input_path()))
            page.locator("#instruction textarea").fill("make the purple circle red")
            page.get_by_text("Advanced").click()
            steps = page.locator("#steps input[type=number]")
            steps.fill("2")
            steps.press("Enter")
            page.locator("#edit-button").click()
            page.locator("#output-video video").wait_for(timeout=240_000)
            page.get_by_text("2 steps").wait_for(timeout=30_000)
            state = _video_state(page, "#output-video video")
            page.screenshot(path=str(tmp_path / "edited.png"), full_page=True)
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
    assert (tmp_path / "edited.png").stat().st_size > 0
