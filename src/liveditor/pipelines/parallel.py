"""Inference on several GPUs of one host: CFG parallel x Ulysses sequence parallel.

World = `cfg_degree` (1 or 2) x `ulysses_degree` ranks. Rank `r` computes the CFG branch
`r // ulysses_degree` (0: the instruction, 1: the negative prompt) together with the other ranks of
its Ulysses group (`liveditor.models.sequence_parallel`); the two branches' flows are exchanged
between corresponding ranks (all-gather) and every rank applies the same guided update, so the
latents stay identical everywhere. Text encoding and the VAE run on rank 0 only.

Start the ranks with `launch(fn, nprocs)` (one process per GPU, NCCL; gloo on CPU) or with
`torchrun` (`init_distributed()` reads its environment); `run_edit_parallel` is `run_edit` on N GPUs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..errors import LIVEditorError


def choose_degrees(world_size: int, guidance: bool, cfg_degree: int | None = None,
                   ulysses_degree: int | None = None) -> tuple[int, int]:
    """(cfg_degree, ulysses_degree) for `world_size` ranks: CFG parallel (2) when the edit uses
    guidance and the world is even, Ulysses over the rest; either can be set, the product must be
    the world size."""
    for name, value in (("--cfg-parallel", cfg_degree), ("--ulysses", ulysses_degree)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LIVEditorError(f"{name} must be a positive integer, got {value!r}")
    if cfg_degree is not None and cfg_degree > 2:
        raise LIVEditorError(f"--cfg-parallel must be 1 or 2 (two guidance branches), got {cfg_degree}")
    if cfg_degree == 2 and not guidance:
        raise LIVEditorError("--cfg-parallel 2 needs classifier-free guidance (a guidance scale other than 1)")
    if cfg_degree is None:
        if ulysses_degree is not None:
            cfg_degree = world_size // ulysses_degree if world_size % ulysses_degree == 0 else 0
        else:
            cfg_degree = 2 if guidance and world_size % 2 == 0 else 1
    if ulysses_degree is None:
        ulysses_degree = world_size // cfg_degree if cfg_degree and world_size % cfg_degree == 0 else 0
    if cfg_degree not in (1, 2) or cfg_degree * ulysses_degree != world_size or (cfg_degree == 2 and not guidance):
        raise LIVEditorError(
            f"{world_size} GPUs cannot be split as CFG parallel x Ulysses = {cfg_degree or '?'} x "
            f"{ulysses_degree or '?'} (CFG parallel is 1 or 2, 2 only with guidance)")
    return cfg_degree, ulysses_degree


@dataclass(frozen=True)
class ParallelLayout:
    """The rank's place in a CFG x Ulysses layout over `ranks` (all ranks of the world by default).

    Build it with `ParallelLayout.create` on every rank of the world (torch.distributed's group
    creation is collective). Ranks outside `ranks` get `active == False`.
    """

    cfg_degree: int
    ulysses_degree: int
    rank: int  # global rank
    ranks: tuple[int, ...]
    ulysses_group: object | None  # the rank's Ulysses process group (None: degree 1)
    cfg_group: object | None  # the rank and its counterpart of the other branch (None: degree 1)
    group: object | None  # all ranks of the layout (None: the whole world)

    @staticmethod
    def create(cfg_degree: int, ulysses_degree: int, ranks=None) -> "ParallelLayout":
        import torch.distributed as dist

        world = dist.get_world_size()
        ranks = tuple(range(world)) if ranks is None else tuple(ranks)
        if cfg_degree not in (1, 2) or ulysses_degree < 1 or len(ranks) != cfg_degree * ulysses_degree:
            raise LIVEditorError(
                f"a layout of CFG {cfg_degree} x Ulysses {ulysses_degree} needs {cfg_degree * ulysses_degree} "
                f"ranks, got {len(ranks)}")
        if len(ranks) > world or len(set(ranks)) != len(ranks) or not all(0 <= r < world for r in ranks):
            raise LIVEditorError(f"ranks {ranks} are not distinct ranks of a world of {world}")
        rank = dist.get_rank()
        ulysses_group = cfg_group = None
        # Every rank takes part in creating every group, members or not.
        layout_group = dist.new_group(list(ranks)) if len(ranks) != world else None
        if ulysses_degree > 1:
            for c in range(cfg_degree):
                members = list(ranks[c * ulysses_degree : (c + 1) * ulysses_degree])
                group = dist.new_group(members)
                if rank in members:
                    ulysses_group = group
        if cfg_degree > 1:
            for u in range(ulysses_degree):
                members = [ranks[u], ranks[ulysses_degree + u]]
                group = dist.new_group(members)
                if rank in members:
                    cfg_group = group
        return ParallelLayout(cfg_degree, ulysses_degree, rank, ranks, ulysses_group, cfg_group, layout_group)

    @property
    def active(self) -> bool:
        return self.rank in self.ranks

    @property
    def is_main(self) -> bool:
        """The first rank of the layout: it encodes text and video, decodes and writes."""
        return self.rank == self.ranks[0]

    @property
    def cfg_rank(self) -> int:
        return self.ranks.index(self.rank) // self.ulysses_degree

    def describe(self) -> str:
        return f"{len(self.ranks)} ranks: CFG parallel {self.cfg_degree} x Ulysses {self.ulysses_degree}"


def guided_flow(predict, prompt_embeds, negative_prompt_embeds, guidance_scale: float,
                layout: ParallelLayout | None = None):
    """The guided flow `uncond + scale * (cond - uncond)`, `predict(embeds)` giving one branch's
    flow; without negative embeddings (no CFG) just `predict(prompt_embeds)`. Under CFG parallel
    each rank runs its own branch and the two flows are all-gathered between counterpart ranks,
    so every rank gets the same guided flow."""
    if negative_prompt_embeds is None:
        return predict(prompt_embeds)
    if layout is None or layout.cfg_degree == 1:
        flow = predict(prompt_embeds)
        flow_uncond = predict(negative_prompt_embeds)
    else:
        from ..models.sequence_parallel import all_gather

        mine = predict(prompt_embeds if layout.cfg_rank == 0 else negative_prompt_embeds)
        flow, flow_uncond = all_gather(mine, 0, layout.cfg_group).chunk(2, dim=0)
    return flow_uncond + guidance_scale * (flow - flow_uncond)


def broadcast_from_main(layout: ParallelLayout, value):
    """`value` of the layout's first rank on every rank of the layout (tensors travel on CPU)."""
    import torch.distributed as dist

    if len(layout.ranks) == 1:
        return value
    box = [value if layout.is_main else None]
    dist.broadcast_object_list(box, src=layout.ranks[0], group=layout.group)
    return box[0]


# ----- processes ---------------------------------------------------------------------------------


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); NCCL with one GPU per local rank when CUDA is there, else gloo.
    Returns (rank, world_size)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _exit_on_sigterm(signum, frame):
    raise SystemExit(1)


def _worker(local_rank: int, world_size: int, port: int, backend: str, fn, args, results: str):
    import torch
    import torch.distributed as dist

    # Results and errors travel as files: a pipe would block a large result until the parent reads.
    folder = Path(results)
    # The launcher ends the other ranks with SIGTERM when one fails: unwind (temporary files of an
    # unfinished output are removed) instead of dying on the spot.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=local_rank, world_size=world_size)
        value = fn(*args)
        # Only after success: a failed rank first records its error, then its exit ends the others.
        dist.destroy_process_group()
        if local_rank == 0:
            with open(folder / "result.pickle", "wb") as f:
                pickle.dump(value, f)
    except BaseException as exc:  # noqa: BLE001 (reported in one line by the parent, then exit 1)
        if os.environ.get("LIVEDITOR_PARALLEL_TRACEBACK"):
            traceback.print_exc()
        # A user error reads the same on every rank; anything else says where it happened.
        message = str(exc) if isinstance(exc, LIVEditorError) else f"rank {local_rank}: {_one_line(exc)}"
        (folder / f"error-{local_rank}.json").write_text(json.dumps(dict(time=time.time(), message=message)))
        raise SystemExit(1) from None


def launch(fn, nprocs: int, args: tuple = (), backend: str | None = None):
    """Run `fn(*args)` on `nprocs` new processes, one per GPU (NCCL; gloo without CUDA), each in
    the process group of all of them, and return rank 0's result. `fn` must be importable (a
    module-level function). If any rank fails, all are ended and one LIVEditorError names the first
    failure (set LIVEDITOR_PARALLEL_TRACEBACK=1 for the full tracebacks)."""
    import torch
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise LIVEditorError(f"the number of GPUs must be a positive integer, got {nprocs!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise LIVEditorError(f"{nprocs} GPUs requested, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="liveditor-ranks-") as results:
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)  # its "terminating process" lines would follow the one error line
        try:
            mp.start_processes(_worker, args=(nprocs, _free_port(), backend, fn, args, results), nprocs=nprocs,
                               join=True, start_method="spawn")
        except ProcessException as exc:
            errors = [json.loads(p.read_text()) for p in Path(results).glob("error-*.json")]
            first = min(errors, key=lambda e: e["time"])["message"] if errors else None
            raise LIVEditorError(first or f"a rank ended without a result ({_one_line(exc)})") from None
        finally:
            spawn_log.setLevel(level)
        path = Path(results) / "result.pickle"
        if not path.is_file():
            raise LIVEditorError("rank 0 ended without a result")
        with open(path, "rb") as f:
            return pickle.load(f)


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch (its environment names a world)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_edit_parallel(gpus: int | None = None, cfg_parallel: int | None = None, ulysses: int | None = None,
                      **edit_kwargs):
    """`liveditor.pipelines.edit.run_edit(**edit_kwargs)` on several GPUs (CFG parallel x Ulysses,
    see `choose_degrees`). Under torchrun this process is one rank (`gpus` must be None or the
    world size); otherwise `gpus` processes are started (`launch`). Rank 0 writes the output and
    prints the summary; its EditReport is returned (on rank 0 only under torchrun)."""
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if gpus is not None and gpus != world:
            raise LIVEditorError(f"--gpus {gpus} differs from torchrun's world size {world}")
        return _edit_rank(cfg_parallel, ulysses, edit_kwargs)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise LIVEditorError(f"--gpus must be a positive integer, got {gpus!r}")
    backend = "gloo" if edit_kwargs.get("device") == "cpu" else None  # CPU ranks: for tests
    return launch(_edit_rank, gpus, (cfg_parallel, ulysses, edit_kwargs), backend=backend)


def _edit_rank(cfg_parallel, ulysses, edit_kwargs):
    from .edit import run_edit

    import torch.distributed as dist

    started_here = not dist.is_initialized()  # torchrun: this process joins, runs and leaves
    rank, _ = init_distributed("gloo" if edit_kwargs.get("device") == "cpu" else None)
    if rank != 0:  # one set of loading bars, the first rank's
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        return run_edit(parallel=(cfg_parallel, ulysses), **edit_kwargs)
    finally:
        if started_here:
            dist.destroy_process_group()
