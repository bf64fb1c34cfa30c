"""`liveditor serve`: a local web editor (Gradio) for one LIVEditor pipeline.

One pipeline serves every visitor; a queue runs one edit at a time (one GPU, or the CPU) and shows
waiting visitors their position. Each visitor's files live in their own temporary folder, removed
when they leave and when the server stops. Nothing is sent anywhere: Gradio's analytics are off,
its assets are served by this server, it binds to 127.0.0.1 unless told otherwise and offers no
public share link.
"""

import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import LIVEditorError, require

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_SECONDS = 60.0
MAX_UPLOAD_SIZE = "1gb"
CACHE_SWEEP = (600, 3600)  # Gradio's file cache: every 10 min, delete files older than an hour
EXAMPLE_INSTRUCTIONS = (  # instructions the bundled tiny model knows for its example clip
    "make the purple circle red",
    "remove the orange star",
    "replace the blue square with a triangle",
    "change the background to navy stripes",
)


@dataclass
class EditSettings:
    """What a visitor chose under "Advanced" and in the Explain tab (None: the model's default)."""

    attention: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None: a random seed, reported back
    select_ratio: float | None = None
    full_ratio: float | None = None
    exact_ratio: float | None = None
    explain_layer: int | None = None
    explain_step: int | None = None


@dataclass
class PageEdit:
    """One finished edit, as the page shows it."""

    output: Path  # H.264 mp4, the download
    side_by_side: Path
    seconds: float
    attention_seconds: float
    attention: str
    seed: int
    steps: int
    num_frames: int
    explanation: object | None  # an eval.explain.ISAExplanation in ISA mode

    @property
    def attention_share(self) -> float:
        return self.attention_seconds / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.num_frames} frames, {self.steps} steps, {self.attention} attention: {self.seconds:.1f} s, "
                f"{100 * self.attention_share:.0f}% of it in attention; seed {self.seed}")


class EditCancelled(LIVEditorError):
    """The visitor pressed Cancel; the edit stopped after a denoising step."""


@dataclass
class _Visitor:
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    editing: bool = False  # an edit of this visitor is waiting for the pipeline or running
    edits: int = 0


class PageEditor:
    """The editing behind the page: input checks, one edit at a time, per-visitor folders.

    ``model``: a pipeline folder (default: the bundled tiny model); ``max_seconds``: the longest
    input video accepted.
    """

    def __init__(self, model=None, device=None, max_seconds: float = DEFAULT_MAX_SECONDS, root=None):
        from .pipelines.loading import load_pipeline, resolve_device

        if not max_seconds > 0:
            raise LIVEditorError(f"--max-seconds must be positive, got {max_seconds}")
        self.max_seconds = float(max_seconds)
        self.device = resolve_device(device)
        self.pipe = load_pipeline(model, device=self.device)
        self.pipe.set_progress_bar_config(disable=True)  # the page shows its own progress
        self.model_name = str(model) if model is not None else "bundled tiny model"
        self.root = Path(tempfile.mkdtemp(prefix="liveditor-serve-", dir=root))
        self._visitors: dict[str, _Visitor] = {}
        self._visitor_count = 0
        self._visitors_lock = threading.Lock()
        self._pipeline_lock = threading.Lock()  # a cancelled job may still finish its step

    # ----- visitors ---------------------------------------------------------------------------

    def visitor(self, session: str) -> _Visitor:
        with self._visitors_lock:
            if session not in self._visitors:
                self._visitor_count += 1
                folder = self.root / "visitors" / f"{self._visitor_count:06d}"
                folder.mkdir(parents=True)
                self._visitors[session] = _Visitor(folder)
            return self._visitors[session]

    def leave(self, session: str) -> None:
        """A visitor closed the page: stop their edit after its step and remove their folder."""
        with self._visitors_lock:
            visitor = self._visitors.pop(session, None)
        if visitor is not None:
            visitor.cancel.set()
            shutil.rmtree(visitor.folder, ignore_errors=True)

    def cancel(self, session: str) -> bool:
        """Stop the visitor's edit after its running step; False (and nothing happens) when none is
        under way."""
        with self._visitors_lock:
            visitor = self._visitors.get(session)
            if visitor is None or not visitor.editing:
                return False
            visitor.cancel.set()
            return True

    def close(self) -> None:
        """Remove every temporary file of the server."""
        shutil.rmtree(self.root, ignore_errors=True)

    # ----- defaults the page offers --------------------------------------------------------------

    @property
    def defaults(self) -> EditSettings:
        from .pipelines.pipeline_liveditor import DEFAULT_SEED

        config = self.pipe.transformer.isa_config
        steps, guidance = self.pipe.sampling_settings()
        return EditSettings(attention=self.pipe.transformer.attention_mode, steps=steps, guidance=guidance,
                            seed=DEFAULT_SEED, select_ratio=config.select_ratio, full_ratio=config.full_ratio,
                            exact_ratio=config.exact_ratio, explain_layer=len(self.pipe.transformer.blocks) // 2,
                            explain_step=steps // 2)

    @property
    def num_layers(self) -> int:
        return len(self.pipe.transformer.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.pipe.transformer.config.num_attention_heads)

    # ----- checks -----------------------------------------------------------------------------

    def check_video(self, path, name: str | None = None):
        """The uploaded file decoded, or a LIVEditorError that names the upload, not a server path."""
        from .data.video_io import probe_video, read_video

        if path is None:
            raise LIVEditorError("upload a video first (or pick the example)")
        path = Path(path)
        name = name or path.name
        try:
            duration = probe_video(path).duration  # 0.0 when the container does not say
            if duration > self.max_seconds:
                raise LIVEditorError(f"{name} is {duration:.1f} s long; this server edits videos up to "
                                     f"{self.max_seconds:g} s")
            clip = read_video(path, max_frames=self.pipe.config.max_num_frames, fps=self.pipe.config.fps)
        except LIVEditorError as exc:
            raise LIVEditorError(str(exc).replace(str(path), name)) from None
        return clip

    # ----- editing ----------------------------------------------------------------------------

    def edit(self, session: str, video_path, instruction: str, settings: EditSettings, progress=None) -> PageEdit:
        """Edit one upload for one visitor. ``progress(done, total)`` is called after each
        denoising step; Cancel (``cancel(session)``) stops the edit after the current step."""
        import torch

        from .data.video_io import write_video
        from .demo import side_by_side
        from .data.video_io import to_uint8_frames
        from .eval.explain import ExplainProbe, model_input_frames

        visitor = self.visitor(session)
        with self._visitors_lock:
            # From the request's arrival, not the pipeline's start: a Cancel pressed while the upload is
            # checked counts too (the page shows the edit as running from the click on).
            visitor.editing = True
        try:
            if not isinstance(instruction, str) or not instruction.strip():
                raise LIVEditorError("the edit instruction is empty")
            clip = self.check_video(video_path)
            attention_kwargs = {}
            if settings.attention is not None:
                if settings.attention not in ("isa", "dense"):
                    raise LIVEditorError(f"attention must be isa or dense, got {settings.attention!r}")
                attention_kwargs["mode"] = settings.attention
            ratios = {k: getattr(settings, k) for k in ("select_ratio", "full_ratio", "exact_ratio")}
            ratios = {k: float(v) for k, v in ratios.items() if v is not None}
            try:
                attention_kwargs["isa_config"] = replace(self.pipe.transformer.isa_config, **ratios)
            except ValueError as exc:
                raise LIVEditorError(str(exc)) from None
            steps, guidance = self.pipe.sampling_settings(settings.steps, settings.guidance)
            if isinstance(steps, float) and steps.is_integer():
                steps = int(steps)
            if not isinstance(steps, int) or not 1 <= steps <= 1000:
                raise LIVEditorError(f"steps must be a whole number from 1 to 1000, got {steps}")
            seed = random.SystemRandom().randrange(2**31) if settings.seed is None else int(settings.seed)
            mode = attention_kwargs.get("mode", self.pipe.transformer.attention_mode)

            with self._pipeline_lock:
                cancel = visitor.cancel
                if cancel.is_set():  # pressed while the upload was checked or the edit waited for the pipeline
                    raise EditCancelled(f"edit cancelled after step 0 of {steps}")
                probe = None
                if mode == "isa":
                    explain_step = None if settings.explain_step is None else min(settings.explain_step, steps - 1)
                    probe = ExplainProbe(self.pipe, settings.explain_layer, explain_step, steps)
                    attention_kwargs["callback"] = probe.attention_callback
                done = []

                def on_step(pipe, step, timestep, callback_kwargs):
                    if probe is not None:
                        probe.step_callback(pipe, step, timestep, callback_kwargs)
                    done.append(step)
                    if progress is not None:
                        progress(step + 1, steps)
                    if cancel.is_set():
                        pipe._interrupt = True
                    return {}

                timer = self.pipe.transformer.attention_timer
                timer.enabled = True
                timer.reset()
                start = time.perf_counter()
                try:
                    result = self.pipe(clip.frames, instruction, num_inference_steps=steps, guidance_scale=guidance,
                                       seed=seed, output_type="np", attention_kwargs=attention_kwargs,
                                       callback_on_step_end=on_step)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                finally:
                    timer.enabled = False
                seconds = time.perf_counter() - start
                if cancel.is_set():
                    raise EditCancelled(f"edit cancelled after step {len(done)} of {steps}")
                explanation = probe.explanation(self.pipe, clip.frames) if probe is not None else None
                source = model_input_frames(self.pipe, clip.frames) if explanation is None else explanation.frames
        finally:
            with self._visitors_lock:
                visitor.editing = False
                visitor.cancel.clear()

        with self._visitors_lock:  # the visitor may have left during the last step
            if self._visitors.get(session) is not visitor:
                raise EditCancelled("the visitor left the page")
            visitor.edits += 1
            folder = visitor.folder / f"edit-{visitor.edits:03d}"
            shutil.rmtree(visitor.folder / f"edit-{visitor.edits - 1:03d}", ignore_errors=True)  # keep one edit
            folder.mkdir()
        edited = result.frames[0]
        output = write_video(folder / "edited.mp4", edited, fps=result.fps)
        both = side_by_side(source, to_uint8_frames(edited), scale=_view_scale(source))
        both = write_video(folder / "input_and_edit.mp4", both, fps=result.fps)
        return PageEdit(output=output, side_by_side=both, seconds=seconds, attention_seconds=timer.seconds,
                        attention=mode, seed=seed, steps=steps, num_frames=int(edited.shape[0]),
                        explanation=explanation)


def _view_scale(frames: np.ndarray) -> int:
    """Enlarge small clips (nearest neighbour) so the side-by-side is at least 256 pixels high."""
    return max(1, math.ceil(256 / frames.shape[1]))


# ----- the page ---------------------------------------------------------------------------------

PAGE_INTRO = """# LIVEditor
Edit a video by an instruction with in-context sparse attention (ISA). Upload a video or pick the
example, type an instruction and press **Edit**. The model runs on this machine; nothing is sent
anywhere."""

EXPLAIN_INTRO = """For one self-attention layer at one denoising step (conditional branch), what ISA
did in this edit, drawn over the input frames: **left**, the context blocks kept by pre-selection
(dimmed: dropped; green: the coarse attention mass the source puts on the block); **middle** and
**right**, the source and context query blocks routed to exact attention (red) or to the Taylor
path (blue). The bar under each panel lists every block of the segment in sequence order. Layer and
step apply to the next edit; the head can be changed afterwards."""


def _gradio():
    """Gradio, imported with its analytics off and its temporary files under ``GRADIO_TEMP_DIR``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    return require("gradio")


def build_app(editor: PageEditor):
    """The Gradio page around ``editor``."""
    gr = _gradio()
    from .demo import example_input_path
    from .eval.explain import render_frames

    defaults = editor.defaults
    steps_max = max(64, defaults.steps)
    with gr.Blocks(title="LIVEditor", analytics_enabled=False, delete_cache=CACHE_SWEEP) as app:
        gr.Markdown(PAGE_INTRO)
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    # A file box, not a video box: it accepts any upload, so a wrong file gets a message.
                    video_in = gr.File(label="Input video (mp4, mov, webm, mkv, avi or gif)", type="filepath",
                                       elem_id="input-video")
                    preview = gr.Video(label="Input", interactive=False, elem_id="input-preview", loop=True)
                    instruction = gr.Textbox(label="Instruction", placeholder="make the purple circle red",
                                             elem_id="instruction")
                    with gr.Accordion("Advanced", open=False):
                        attention = gr.Radio(["isa", "dense"], value=defaults.attention, label="Attention",
                                             elem_id="attention")
                        steps = gr.Slider(1, steps_max, value=defaults.steps, step=1, label="Denoising steps",
                                          elem_id="steps")
                        guidance = gr.Number(value=defaults.guidance, label="Guidance (text CFG; 1 = off)")
                        seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed")
                        select_ratio = gr.Slider(0.01, 1.0, value=defaults.select_ratio, step=0.01,
                                                 label="ISA: context blocks kept (select ratio)")
                        full_ratio = gr.Slider(0.01, 1.0, value=defaults.full_ratio, step=0.01,
                                               label="ISA: query blocks sent to exact attention (full ratio)")
                        exact_ratio = gr.Slider(0.01, 1.0, value=defaults.exact_ratio, step=0.01,
                                                label="ISA: exact key blocks of a Taylor query block (exact ratio)")
                    with gr.Row():
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                        cancel_button = gr.Button("Cancel", elem_id="cancel-button")
                    gr.Examples([[str(example_input_path()), text] for text in EXAMPLE_INSTRUCTIONS],
                                inputs=[video_in, instruction], label="Example (the bundled model knows these)")
                with gr.Column():
                    video_out = gr.Video(label="Edited video", elem_id="output-video", autoplay=True, loop=True)
                    both_out = gr.Video(label="Input | edit", elem_id="side-by-side", autoplay=True, loop=True)
                    report = gr.Markdown(elem_id="edit-report")
                    download = gr.File(label="Download the edited mp4", elem_id="download")
        with gr.Tab("Explain"):
            gr.Markdown(EXPLAIN_INTRO)
            with gr.Row():
                layer = gr.Slider(0, editor.num_layers - 1, value=defaults.explain_layer, step=1, label="Layer")
                step = gr.Slider(0, steps_max - 1, value=defaults.explain_step, step=1,
                                 label="Denoising step (capped at the edit's last step)")
                head = gr.Dropdown(["mean of all heads"] + [f"head {i}" for i in range(editor.num_heads)],
                                   value="mean of all heads", label="Heads")
            explain_report = gr.Markdown(elem_id="explain-report")
            gallery = gr.Gallery(label="What ISA did, frame by frame", columns=1, object_fit="contain",
                                 height="auto", elem_id="explain-gallery")
            explain_video = gr.Video(label="As a clip", elem_id="explain-video")
        explanation = gr.State(None)

        def run(video, text, attention_, steps_, guidance_, seed_, random_seed_, select_, full_, exact_,
                layer_, step_, head_, request: gr.Request, progress=gr.Progress()):
            settings = EditSettings(
                attention=attention_, steps=int(steps_), guidance=float(guidance_),
                seed=None if random_seed_ else int(seed_), select_ratio=select_, full_ratio=full_,
                exact_ratio=exact_, explain_layer=int(layer_), explain_step=int(step_),
            )
            try:
                done = editor.edit(request.session_hash, video, text, settings,
                                   progress=lambda i, n: progress((i, n), desc="denoising", unit="steps"))
            except EditCancelled as exc:
                print(f"liveditor serve: {exc}", flush=True)  # the page stopped listening when Cancel was pressed
                raise gr.Error(str(exc), print_exception=False) from None
            except LIVEditorError as exc:
                raise gr.Error(str(exc), duration=None, print_exception=False) from None
            pictures, clip, notes = _explain_outputs(editor, done.explanation, head_, request.session_hash,
                                                     render_frames)
            return (str(done.output), str(done.side_by_side), done.summary(), str(done.output), done.explanation,
                    pictures, clip, notes)

        def show_input(video):
            if video is None:
                return None
            try:
                editor.check_video(video)
            except LIVEditorError as exc:
                raise gr.Error(str(exc), duration=None, print_exception=False) from None
            return video

        def redraw(expl, head_, request: gr.Request):
            return _explain_outputs(editor, expl, head_, request.session_hash, render_frames)

        inputs = [video_in, instruction, attention, steps, guidance, seed, random_seed, select_ratio, full_ratio,
                  exact_ratio, layer, step, head]
        outputs = [video_out, both_out, report, download, explanation, gallery, explain_video, explain_report]
        video_in.change(show_input, video_in, preview, concurrency_limit=None)
        edit_event = edit_button.click(run, inputs, outputs, concurrency_limit=1, concurrency_id="pipeline")

        def cancel(request: gr.Request):
            if not editor.cancel(request.session_hash):  # logged: a press that reached no edit is otherwise silent
                print("liveditor serve: Cancel pressed with no edit under way", flush=True)

        cancel_button.click(cancel, None, None, cancels=[edit_event], queue=False)
        head.change(redraw, [explanation, head], [gallery, explain_video, explain_report], concurrency_limit=None)
        def leave(request: gr.Request):
            editor.leave(request.session_hash)

        app.unload(leave)
    return app


def _explain_outputs(editor: PageEditor, expl, head_choice: str, session: str, render_frames):
    """Gallery images, clip and caption of an explanation (ISA mode), or a note why there is none."""
    from .data.video_io import write_video

    if expl is None:
        return [], None, "The last edit ran with dense attention: there is no ISA routing to show."
    head = None if head_choice.startswith("mean") else int(head_choice.split()[-1])
    images = render_frames(expl, head)
    folder = editor.visitor(session).folder / "explain"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    clip = write_video(folder / f"explain-{time.monotonic_ns()}.mp4", np.stack([np.asarray(i) for i in images]),
                       fps=max(1.0, min(8.0, len(images) / 4.0)))
    s = expl.summary(head)
    notes = (f"Layer {s['layer']} of 0..{s['num_layers'] - 1}, step {s['step']} of 0..{s['num_steps'] - 1}, "
             f"{s['heads']}: "
             f"{s['num_kept_context_blocks']} of {s['num_context_blocks']} context blocks kept, "
             f"{s['num_exact_query_blocks']} of {s['num_query_blocks']} query blocks exact, "
             f"**{100 * s['flop_fraction']:.1f}% of dense attention's FLOPs**.")
    return images, str(clip), notes


def serve(model=None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device=None,
          max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
    """Run the web editor until interrupted; its temporary files are removed on exit."""
    editor = PageEditor(model, device=device, max_seconds=max_seconds)
    os.environ["GRADIO_TEMP_DIR"] = str(editor.root / "gradio")  # uploads and Gradio's copies of outputs
    try:
        from .demo import example_input_path

        app = build_app(editor)
        app.queue(default_concurrency_limit=1)
        try:
            app.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True,
                       prevent_thread_lock=True, allowed_paths=[str(example_input_path().parent)],
                       max_file_size=MAX_UPLOAD_SIZE, ssr_mode=False, mcp_server=False, pwa=False,
                       enable_monitoring=False, footer_links=[])
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise LIVEditorError(f"cannot serve on {host}:{port} ({str(exc).split('.')[0]})") from None
        print(f"LIVEditor web editor ({editor.model_name} on {editor.device}): http://{host}:{port}  (Ctrl+C stops)",
              flush=True)
        signal.signal(signal.SIGTERM, _stop)  # a service manager's stop also removes the temporary files
        app.block_thread()
    finally:
        editor.close()


def _stop(signum, frame):
    raise SystemExit(0)
