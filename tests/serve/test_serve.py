"""The web editor's editing, checks, cancel and per-visitor folders (no browser; the bundled model on CPU)."""

import numpy as np
import pytest

from liveditor.data.video_io import read_video, write_video
from liveditor.demo import example_input_path
from liveditor.errors import LIVEditorError
from liveditor.serve import EditCancelled, EditSettings, PageEditor

INSTRUCTION = "make the purple circle red"


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    editor = PageEditor(device="cpu", max_seconds=2.5, root=tmp_path_factory.mktemp("serve"))
    yield editor
    editor.close()
    assert not editor.root.exists()


def _corrupt(path, seed):
    rng = np.random.default_rng(seed)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.with_suffix(".txt").write_text("not a video"), "notes.txt has unsupported extension '.txt'"),
        (lambda p: p.write_bytes(b""), "notes.mp4 is empty (0 bytes)"),
        (lambda p: _corrupt(p, 0), "cannot decode notes.mp4 as a video"),
        (lambda p: _corrupt(p, 1), "cannot decode notes.mp4 as a video"),
        (lambda p: write_video(p, np.random.default_rng(2).integers(0, 255, (24, 64, 64, 3), dtype=np.uint8), fps=8),
         "notes.mp4 is 3.0 s long; this server edits videos up to 2.5 s"),
    ],
)
def test_bad_uploads_get_a_message_naming_the_upload(editor, tmp_path, make, message):
    path = tmp_path / "notes.mp4"
    make(path)
    path = path if path.exists() else path.with_suffix(".txt")
    with pytest.raises(LIVEditorError) as caught:
        editor.edit("visitor-a", path, INSTRUCTION, EditSettings(steps=1))
    assert message in str(caught.value)
    assert str(tmp_path) not in str(caught.value)  # the page never shows server paths


def test_missing_upload_and_empty_instruction(editor):
    with pytest.raises(LIVEditorError, match="upload a video first"):
        editor.edit("visitor-a", None, INSTRUCTION, EditSettings(steps=1))
    with pytest.raises(LIVEditorError, match="instruction is empty"):
        editor.edit("visitor-a", example_input_path(), "   ", EditSettings(steps=1))
    with pytest.raises(LIVEditorError, match="select_ratio"):
        editor.edit("visitor-a", example_input_path(), INSTRUCTION, EditSettings(steps=1, select_ratio=0.0))


def test_edit_reports_and_reproduces_its_seed(editor):
    steps_seen = []
    first = editor.edit("visitor-b", example_input_path(), INSTRUCTION, EditSettings(steps=2, seed=None, attention="isa"),
                        progress=lambda done, total: steps_seen.append((done, total)))
    assert steps_seen == [(1, 2), (2, 2)]  # the page's progress bar
    edited = read_video(first.output).frames
    assert edited.shape == (16, 64, 64, 3) and first.num_frames == 16
    both = read_video(first.side_by_side).frames
    assert both.shape[0] == 16 and both.shape[2] > 2 * both.shape[1] - 10  # two enlarged 64x64 panels
    assert 0 < first.attention_share <= 1 and first.attention == "isa" and f"seed {first.seed}" in first.summary()
    # The explanation of the default layer at the default step (the middle of this edit's two steps).
    assert (first.explanation.layer, first.explanation.step, first.explanation.num_steps) == (4, 1, 2)
    again = editor.edit("visitor-b", example_input_path(), INSTRUCTION, EditSettings(steps=2, seed=first.seed,
                                                                                      attention="isa", explain_step=0))
    assert again.explanation.step == 0
    np.testing.assert_array_equal(read_video(again.output).frames, edited)
    # One edit kept per visitor: the first one's files are gone.
    assert not first.output.exists() and again.output.exists()
    dense = editor.edit("visitor-b", example_input_path(), INSTRUCTION, EditSettings(steps=1, attention="dense"))
    assert dense.attention == "dense" and dense.explanation is None


def test_cancel_stops_after_the_current_step(editor):
    steps_seen = []

    def press_cancel(done, total):
        steps_seen.append(done)
        assert editor.cancel("visitor-c")  # an edit was under way

    with pytest.raises(EditCancelled, match="after step 1 of 6"):
        editor.edit("visitor-c", example_input_path(), INSTRUCTION, EditSettings(steps=6), progress=press_cancel)
    assert steps_seen == [1]
    # The next edit of that visitor is not cancelled, nor by a Cancel pressed while nothing ran.
    assert not editor.cancel("visitor-c")
    done = editor.edit("visitor-c", example_input_path(), INSTRUCTION, EditSettings(steps=1))
    assert done.output.exists()


def test_cancel_pressed_while_the_upload_is_checked_stops_the_edit(editor, monkeypatch):
    # The page shows an edit as running from the click on; a Cancel pressed before the first
    # denoising step (here: during the upload's check) must not leave the edit running unseen.
    check_video = editor.check_video

    def check_and_press_cancel(path, name=None):
        editor.cancel("visitor-e")
        return check_video(path, name)

    monkeypatch.setattr(editor, "check_video", check_and_press_cancel)
    steps_seen = []
    with pytest.raises(EditCancelled, match="after step 0 of 6"):
        editor.edit("visitor-e", example_input_path(), INSTRUCTION, EditSettings(steps=6),
                    progress=lambda done, total: steps_seen.append(done))
    assert steps_seen == []
    monkeypatch.undo()
    assert editor.edit("visitor-e", example_input_path(), INSTRUCTION, EditSettings(steps=1)).output.exists()


def test_a_visitor_who_leaves_stops_their_edit(editor):
    folder = editor.visitor("visitor-d").folder

    def leave(done, total):
        editor.leave("visitor-d")

    with pytest.raises(EditCancelled, match="after step 1 of 5"):
        editor.edit("visitor-d", example_input_path(), INSTRUCTION, EditSettings(steps=5), progress=leave)
    assert not folder.exists()


def test_visitors_have_their_own_folders_removed_when_they_leave(editor):
    a, b = editor.visitor("visitor-x"), editor.visitor("visitor-y")
    assert a.folder != b.folder and a.folder.is_dir() and b.folder.is_dir()
    (a.folder / "upload.mp4").write_bytes(b"x")
    editor.leave("visitor-x")
    assert not a.folder.exists() and b.folder.is_dir()
    assert editor.visitor("visitor-x").folder != a.folder


def test_the_page_has_its_parts(editor):
    pytest.importorskip("gradio")
    from liveditor.serve import build_app

    app = build_app(editor)
    ids = {block.elem_id for block in app.blocks.values()}
    assert {"input-video", "instruction", "edit-button", "cancel-button", "output-video", "side-by-side",
            "download", "explain-gallery"} <= ids
    (run_id,) = [i for i, fn in app.fns.items() if fn.name == "run"]
    assert app.fns[run_id].concurrency_limit == 1  # one edit at a time; the others queue
    # Cancel also drops a waiting edit from the queue.
    assert any(fn.is_cancel_function and run_id in fn.cancels for fn in app.fns.values())


def test_serve_command_line_errors(capsys, monkeypatch, tmp_path):
    import socket

    from liveditor.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--max-seconds", "0"])
    assert exited.value.code == 2 and "--max-seconds: must be > 0" in capsys.readouterr().err
    pytest.importorskip("gradio")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # serve() points it at its own folder; restored after
    with socket.socket() as taken:  # a port that another program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
