"""The command line as a newcomer meets it: argument checks before any heavy import, one-line
errors naming the fix, --version, --debug anywhere, the project's own error type only."""

import sys
import time

import pytest

from liveditor import __version__
from liveditor.cli import main
from liveditor.errors import LIVEditorError
from python_process import run_python

RUN_BEFORE_IMPORTS = """
import sys, time
from liveditor.cli import main
cases = {cases!r}
for argv, fragment in cases:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse rejects an option value
        rc = exc.code
    assert rc == 2, (argv, rc)
assert "torch" not in sys.modules and "diffusers" not in sys.modules and "transformers" not in sys.modules
print("no heavy imports")
"""


def _run_python(code: str):
    start = time.perf_counter()
    result = run_python("-c", code)
    return result, time.perf_counter() - start


def test_bad_arguments_fail_fast_with_one_line_before_torch_or_diffusers(tmp_path):
    clip = tmp_path / "in.mp4"
    clip.write_bytes(b"\\x00" * 16)
    out = str(tmp_path / "o.mp4")
    cases = [
        (["edit", str(tmp_path / "missing.mp4"), "x", "-o", out], "input video"),
        (["edit", str(clip), "x", "-o", out, "--guidance", "inf"], "--guidance: must be a finite number"),
        (["edit", str(clip), "x", "-o", out, "--guidance", "nan"], "--guidance: must be a finite number"),
        (["edit", str(clip), "x", "-o", out, "--seed", str(2**64)], "--seed: must be -1 (random) or between 0"),
        (["edit", str(clip), "x", "-o", out, "--seed", "-2"], "--seed: must be -1"),
        (["edit", str(clip), "x", "-o", out, "--steps", "0"], "--steps: must be at least 1"),
        (["edit", str(clip), "x", "-o", out, "--window", "0"], "--window: must be at least 1"),
        (["edit", str(clip), "x", "-o", out, "--start", "-1"], "--start: must be >= 0"),
        (["edit", str(clip), "x", "-o", out, "--duration", "0"], "--duration: must be > 0"),
        (["edit", str(clip), "x", "-o", out, "--device", "gpu"], "unknown device 'gpu'"),
        (["demo", "-o", str(tmp_path / "d"), "--device", "gpu"], "unknown device 'gpu'"),
        (["demo", "-o", str(tmp_path / "d"), "--seed", str(2**70)], "--seed"),
        (["demo", "-o", str(tmp_path / "d"), "--steps", "-3"], "--steps"),
        (["demo", "-o", str(tmp_path / "d"), "--guidance", "inf"], "--guidance"),
        (["demo", "-o", str(tmp_path / "d"), "--model", str(tmp_path / "no-model")], "does not exist"),
        (["eval", "shapeedit", "--per-family", "0"], "--per-family"),
        (["record-activations", "--clips", "0"], "--clips"),
    ]
    result, seconds = _run_python(RUN_BEFORE_IMPORTS.format(cases=cases))
    assert result.returncode == 0, result.stderr
    assert "no heavy imports" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(cases), result.stderr
    for line, (_, fragment) in zip(lines, cases):
        assert fragment in line and "error" in line and "Traceback" not in line, line
    assert not (tmp_path / "d").exists()  # the failed demo left no folder behind
    # "Fails fast": the measured cost of all these errors is one interpreter start, no model stack.
    assert seconds < 5.0, seconds


def test_missing_optional_dependency_is_one_line_naming_the_install(tmp_path):
    from liveditor.demo import example_input_path

    code = (
        "import sys\nsys.modules['diffusers'] = None  # as if not installed\n"
        "from liveditor.cli import main\n"
        f"sys.exit(main(['edit', {str(example_input_path())!r}, 'make the purple circle red', '-o', "
        f"{str(tmp_path / 'o.mp4')!r}]))\n"
    )
    result, _ = _run_python(code)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "liveditor edit: error: the optional dependency 'diffusers' is not installed: pip install 'liveditor[editor]'")


def test_only_the_projects_errors_are_one_liners(monkeypatch, tmp_path, capsys):
    """A ValueError is a bug, not a user error: it keeps its traceback."""

    def broken(**kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr("liveditor.pipelines.edit.run_edit", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["edit", "in.mp4", "x", "-o", str(tmp_path / "o.mp4")])


ENCODER_DIES = """
import sys
import liveditor.pipelines.edit
from liveditor.cli import main

def encoder_died(**kwargs):
    raise BrokenPipeError(32, "Broken pipe")

liveditor.pipelines.edit.run_edit = encoder_died
sys.exit(main(["edit", "in.mp4", "x", "-o", {output!r}]))
"""


def test_a_broken_pipe_other_than_stdout_keeps_its_traceback(tmp_path):
    """Only a reader of stdout going away ends a command quietly (tests/eval/test_compare.py); a pipe
    to another process breaking mid-command (an encoder that died) is a failure, also when stdout is
    a pipe whose reader is still there."""
    result = run_python("-c", ENCODER_DIES.format(output=str(tmp_path / "o.mp4")))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "BrokenPipeError" in result.stderr


def test_version_and_help_document_the_seed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"liveditor {__version__}"
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED noise seed" in text and "default 42" in text and "-1: random" in text
    assert "--window" in text and "--start" in text and "--duration" in text and "--resize {crop,pad}" in text


COLLECTOR_BY_CALLER = """
import gc, sys
import diffusers  # imports torch._dynamo and Triton, whose nanobind objects must be freed at exit
from liveditor.cli import main
default = gc.get_threshold()
try:
    main(["--version"])
except SystemExit:
    pass
print("after main(argv):", gc.get_threshold() == default)
sys.argv = ["liveditor", "--version"]
try:
    main()
except SystemExit:
    pass
print("after main():", gc.get_threshold() != default)
"""


def test_only_the_program_tunes_the_garbage_collector_and_exits_cleanly():
    """`liveditor` (main() on sys.argv) spares the collector the model stack's import-time objects;
    main(argv), a library call, leaves the process's collector alone; the process ends without
    leak reports on stderr."""
    result, _ = _run_python(COLLECTOR_BY_CALLER)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "after main(argv): True" in lines and "after main(): True" in lines, result.stdout
    assert "leaked" not in result.stderr, result.stderr[-2000:]


def test_train_on_cpu_warns_with_the_default_config():
    import torch

    from liveditor.cli import _warn_if_training_on_cpu
    from liveditor.training import load_config

    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU-only machines")
    with pytest.warns(UserWarning, match="training on the CPU, about .* min and .* GB a step"):
        _warn_if_training_on_cpu(load_config("configs/tiny-shapeedit.toml", []))
    measured = ["train.batch_size=32", "data.frames=16", "data.height=64", "data.width=64", "model.num_layers=8",
                "model.num_attention_heads=4", "model.attention_head_dim=64"]  # the configuration the estimate was measured on
    with pytest.warns(UserWarning, match="training on the CPU, about 3.0 min and 20 GB a step"):
        _warn_if_training_on_cpu(load_config("configs/tiny-shapeedit.toml", measured))
    small = load_config("configs/tiny-shapeedit.toml", ["train.batch_size=1", "data.frames=4"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_training_on_cpu(small)


def test_a_missing_web_extra_is_one_line_naming_the_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ModuleNotFoundError("No module named 'gradio'", name="gradio")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "gradio", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_gradio)
    from liveditor.serve import _gradio

    with pytest.raises(LIVEditorError, match=r"pip install 'liveditor\[web\]'"):
        _gradio()
