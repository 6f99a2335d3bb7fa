"""Periodic checkpoints, the best checkpoint, and resume at the exact step.

:class:`Checkpointer` is what the training loop (``rectrain/train/loop.py``) calls:

- ``restore(state)`` at start: loads the checkpoint named by ``checkpoint.resume`` (``latest``,
  a URL, or ``auto`` = latest if any) into the sharded model and both optimisers (DCP reshards to
  the current world size and plan) and fills the loop's :class:`~rectrain.train.state.
  TrainState` (epoch, data position, step, best epoch, history, totals);
- ``train_tables(epoch, state)`` gives this rank's train tables for the epoch, from the saved
  position when ``checkpoint.every_n_steps`` is set (deterministic order,
  :class:`~rectrain.data.order.GlobalOrder`), or ``None`` to keep Ray Data's streaming order;
- ``after_step(state, ...)`` saves every ``every_n_steps`` global steps; ``end_epoch(state)``
  saves after validation; both keep the newest ``keep_last`` checkpoints;
- ``save_best(state)`` writes ``run_dir/checkpoint`` with the best epoch's score in its meta.

Checkpoint folders: ``run_dir/checkpoints/step-<8 digits>`` (atomic, see
:mod:`rectrain.checkpoint`). ``meta.json`` holds ``progress``: the fields of
:class:`~rectrain.train.state.TrainState` (``rows_done`` = the data position: rows of that
epoch's permutation consumed; ``carry`` = the epoch's partial rows/seconds/loss), the world size,
the batch size and each rank's torch RNG state (restored when the world size is unchanged, so
dropout continues identically).

With a different world size the step counter is recomputed as ``samples_seen // (W' * B)`` so the
learning-rate schedule continues at the same fraction of the samples.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from rectrain.config import RETRIEVAL_MODELS
from rectrain.data import storage
from rectrain.data.order import GlobalOrder
from rectrain.data.schema import check_same_data, data_identity, grown_tables, load_manifest
from rectrain.checkpoint import is_complete, load_checkpoint, save_checkpoint
from rectrain.train.state import Best, EpochCarry, TrainState

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoints_url(run_dir: str) -> str:
    return storage.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete periodic checkpoints of a run as ``(step, url)``, oldest first."""
    root = checkpoints_url(run_dir)
    fs, path = storage.url_to_fs(root)
    if not fs.exists(path):
        return []
    out = []
    for p in fs.ls(path, detail=False):
        m = _STEP_DIR.search(p.rstrip("/"))
        if m:
            url = storage.join(root, p.rstrip("/").rsplit("/", 1)[-1])
            if is_complete(url):
                out.append((int(m.group(1)), url))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    """URL of the newest complete periodic checkpoint of a run, None when it has none."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(run_dir: str, resume: str | None) -> str | None:
    """The checkpoint URL ``resume`` names: ``latest``/``auto`` = newest complete one under
    ``run_dir/checkpoints`` (``auto``: None when there is none), a run directory (its latest),
    or a checkpoint URL.

    Raises:
        FileNotFoundError: ``latest`` with no complete checkpoint, or a URL that holds none.
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        latest = latest_checkpoint(run_dir)
        if latest or resume == "auto":
            return latest
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under "
                                f"{checkpoints_url(run_dir)}")
    if is_complete(resume):
        return resume
    latest = latest_checkpoint(resume)
    if latest:
        return latest
    raise FileNotFoundError(f"--resume {resume}: neither a complete checkpoint (meta.json) nor a "
                            f"run directory with checkpoints/step-*")


def resolve_warm_start(source: str) -> str:
    """The checkpoint ``checkpoint.warm_start`` names: a checkpoint URL itself, else the run
    directory's best checkpoint (``source/checkpoint``), else its newest periodic one.

    Raises:
        FileNotFoundError: none of these is complete (names the field and ``source``).
    """
    if is_complete(source):
        return source
    best = storage.join(source, "checkpoint")
    if is_complete(best):
        return best
    latest = latest_checkpoint(source)
    if latest:
        return latest
    raise FileNotFoundError(f"checkpoint.warm_start: {source} is neither a complete checkpoint "
                            f"(meta.json) nor a run directory with checkpoint/ or "
                            f"checkpoints/step-*")


def prepare_run(cfg):
    """Driver side, before workers start: ``latest``/URL in ``checkpoint.resume`` and
    ``checkpoint.warm_start`` are resolved now (a missing checkpoint fails before any worker
    starts), and their data is compared with ``prepared_dir``'s manifest
    (:func:`rectrain.data.schema.check_same_data`, ValueError); None and ``auto`` stay.
    Returns a copy of ``cfg`` with them resolved. The run then writes
    into an attempt folder (:func:`rectrain.train.attempt.start_attempt`), so nothing of the
    previous run is deleted before this one succeeds."""
    cfg = cfg.model_copy(deep=True)
    ck = cfg.checkpoint
    if ck.resume not in (None, "auto"):
        ck.resume = resolve_resume(cfg.run_dir, ck.resume)
    if ck.warm_start is not None:
        ck.warm_start = resolve_warm_start(ck.warm_start)
    url = storage.join(cfg.prepared_dir, "manifest.json")
    manifest = storage.read_json(url) if storage.exists(url) else None
    if cfg.model.name in RETRIEVAL_MODELS and manifest and manifest.get("negatives"):
        # prepared by a ranking job's config sharing this prepared_dir
        raise ValueError(f"{cfg.prepared_dir}: prepared with dataset.negatives (sampled "
                         f"label-0 rows), which {cfg.model.name} would read as positives; "
                         "prepare a folder without negatives for retrieval models")
    for ck_url in (u for u in (ck.warm_start, ck.resume) if u not in (None, "auto")):
        meta = storage.join(ck_url, "meta.json")
        if manifest is not None and storage.exists(meta):  # before workers, not in each
            check_same_data(storage.read_json(meta).get("data"), manifest, ck_url,
                            cfg.prepared_dir, grow=True)
    return cfg


def _remove_old_run(run_dir: str) -> None:
    """A fresh run replaces an earlier run's checkpoints in the same run directory (periodic
    ones and the best one), so that neither is ever resumed from or adopted as best."""
    for name in ("checkpoints", "checkpoint", "checkpoint.tmp", "faults"):
        storage.remove(storage.join(run_dir, name))


def _rank_states(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Periodic and best checkpoints, and resume, for one rank of :func:`rectrain.train.loop.run`.

    ``score(valid_metrics) -> float`` is the task's selection score: a best checkpoint saved
    without a ``score`` in its meta is re-scored with it.
    """

    def __init__(self, cfg, env, dmp, optimizer, plan, columns: list[str], score):
        self.cfg, self.env, self.dmp, self.optimizer, self.plan = cfg, env, dmp, optimizer, plan
        self.spec = cfg.checkpoint
        self.score = score
        self.root = checkpoints_url(cfg.run_dir)
        self.best_url = storage.join(cfg.run_dir, "checkpoint")
        self.batch = cfg.train.batch_size
        self.deterministic = self.spec.every_n_steps is not None
        self.order = (GlobalOrder(storage.join(cfg.prepared_dir, "train"), cfg.train.seed,
                                  columns) if self.deterministic else None)
        self._t_epoch = 0.0
        self.manifest = load_manifest(cfg.prepared_dir)
        #: {"from": checkpoint URL, "data": "same"|"extends"|"unchecked", "grown": {table:
        #: [rows at the checkpoint, rows now]}} after a warm start
        self.warm_started: dict | None = None

    # ---------------------------------------------------------------- restore
    def restore(self, state: TrainState) -> bool:
        """Load the checkpoint ``checkpoint.resume`` names into the model, the optimisers and
        ``state`` (collective). Returns True when a checkpoint was loaded.

        Raises:
            FileNotFoundError: ``resume`` names no complete checkpoint.
            ValueError: a mid-epoch checkpoint without ``checkpoint.every_n_steps``, or the
                prepared data changed since the checkpoint (its manifest fingerprint differs).
        """
        if self.spec.resume is None:  # fresh run (torchrun / tests): old checkpoints go
            if self.env.rank == 0:
                _remove_old_run(self.cfg.run_dir)
            if dist.is_initialized():
                dist.barrier()
            url = None
        else:
            url = resolve_resume(self.cfg.run_dir, self.spec.resume)
        if url is None:  # a run restarted after a failure resumes its own checkpoint instead
            return self._warm_start() if self.spec.warm_start else False
        meta, _, _ = self._load(url)
        p = meta["progress"]
        saved = TrainState.from_dict(p)
        if saved.rows_done and not self.deterministic:
            raise ValueError(f"{url}: saved mid-epoch (row {saved.rows_done} of epoch "
                             f"{saved.epoch}); resuming it needs checkpoint.every_n_steps "
                             f"(the deterministic train order) to be set")
        env = self.env
        same_world = p["world_size"] == env.world
        if not same_world:  # the lr schedule continues at the same fraction of the samples
            saved.step = saved.samples_seen // (self.batch * env.world)
        if same_world and p.get("rng"):
            torch.set_rng_state(torch.tensor(np.frombuffer(bytes.fromhex(p["rng"][env.rank]),
                                                           dtype=np.uint8).copy()))
        else:
            torch.manual_seed(self.cfg.train.seed + 7919 * (saved.step + 1) + env.rank)
        if is_complete(self.best_url):
            bm = storage.read_json(storage.join(self.best_url, "meta.json"))
            score = bm["score"] if bm.get("score") is not None else self.score(bm["valid"])
            if score > saved.best.score:  # a later best was committed just before a crash
                saved.best = Best(epoch=bm["epoch"], score=score, valid=bm["valid"])
        elif saved.best.epoch >= 0:  # resumed from another run: its best weights are not here
            saved.best = Best()
        for k, v in vars(saved).items():
            setattr(state, k, v)
        if env.rank == 0:
            print(f"[rectrain] resumed from {url}: epoch {state.epoch}, row {state.rows_done} "
                  f"of the epoch, step {state.step} (saved with {p['world_size']} workers, now "
                  f"{env.world})", flush=True)
        return True

    def _load(self, url: str) -> tuple[dict, str, dict]:
        """Check the prepared data against checkpoint ``url``'s, then load it (collective),
        growing the tables that grew since. Returns ``(meta, how, grown)``: the checkpoint's
        ``meta.json``, :func:`check_same_data`'s verdict and :func:`grown_tables`.

        Raises:
            ValueError: the data neither equals nor extends the checkpoint's (checked before
                DCP: other table sizes would fail deep inside it, equal ones load silently).
        """
        saved = storage.read_json(storage.join(url, "meta.json")).get("data")
        how = check_same_data(saved, self.manifest, url, self.cfg.prepared_dir, grow=True)
        grown = grown_tables(saved, self.manifest)
        return load_checkpoint(url, self.dmp, self.optimizer, grow=grown), how, grown

    def _warm_start(self) -> bool:
        """Load ``checkpoint.warm_start``'s model and optimiser state (collective; DCP
        reshards to this world size and plan); epoch, step, best and history stay fresh.
        Tables that grew since (``vocab`` without or with a raised ``capacity``) are loaded in
        place: the saved rows keep their row, values and optimiser state, the new rows their
        fresh initialisation (:func:`rectrain.checkpoint.load_checkpoint` ``grow``).

        Raises:
            ValueError: the prepared data neither equals nor extends the checkpoint's, or a
                table shrank or was renumbered (:func:`rectrain.data.schema.check_same_data`).
        """
        url = resolve_warm_start(self.spec.warm_start)
        _, how, grown = self._load(url)
        self.warm_started = {"from": url, "data": how, "grown": grown}
        if self.env.rank == 0:
            rows = "".join(f"; table {t} grown {a} -> {b} rows" for t, (a, b) in grown.items())
            print(f"[rectrain] warm start from {url} (prepared data: {how}{rows}); epoch, step "
                  f"and best start afresh", flush=True)
        return True

    # ---------------------------------------------------------------- data
    def train_tables(self, epoch: int, state: TrainState):
        """This rank's train tables for ``epoch`` in the deterministic order (from
        ``state.rows_done`` when resuming inside it), or None in streaming mode (use the Ray
        Data shard)."""
        self._t_epoch = time.perf_counter()
        if not self.deterministic:
            return None
        return self.order.batches(epoch, state.rows_done, self.env.rank, self.env.world,
                                  self.batch)

    def rng(self, np_rng):
        """The block-shuffle generator for ``rebatch``: None in deterministic order (the rows are
        already permuted; nothing random left to restore)."""
        return None if self.deterministic else np_rng

    # ---------------------------------------------------------------- saving
    def _save(self, url: str, state: TrainState, extra: dict | None = None) -> str:
        rng = _rank_states(torch.get_rng_state().numpy().tobytes().hex(), self.env.world)
        progress = {**state.to_dict(), "world_size": self.env.world,
                    "batch_size": self.batch, "deterministic_order": self.deterministic,
                    "rng": rng}
        save_checkpoint(url, self.dmp, self.optimizer, meta={
            "epoch": state.epoch, "step": state.step, "progress": progress,
            "world_size": self.env.world, "plan": str(self.plan),
            "config": self.cfg.model_dump(mode="json"), "data": data_identity(self.manifest),
            **(extra or {})})
        return url

    def _save_periodic(self, state: TrainState) -> str:
        url = self._save(storage.join(self.root, f"step-{state.step:08d}"), state)
        if self.env.rank == 0:
            self._prune()
        if dist.is_initialized():
            dist.barrier()
        return url

    def save_best(self, state: TrainState) -> None:
        """Write the best checkpoint (``run_dir/checkpoint``) for ``state.best`` (collective)."""
        b = state.best
        self._save(self.best_url, state, {"epoch": b.epoch, "valid": b.valid,
                                          "score": b.score})

    def _prune(self) -> None:
        done = list_checkpoints(self.cfg.run_dir)
        for _, url in done[:-self.spec.keep_last]:
            storage.remove(url)
        fs, path = storage.url_to_fs(self.root)
        for p in fs.ls(path, detail=False):  # leftovers of crashed saves
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".tmp") or (_STEP_DIR.search(name)
                                         and not is_complete(storage.join(self.root, name))):
                storage.remove(storage.join(self.root, name))

    def epoch_part(self, steps: int, loss_mean: float, loss_n: int) -> EpochCarry:
        """The epoch so far: the carried part (trained before a resume) plus ``steps`` global
        steps of this process with mean loss ``loss_mean`` over ``loss_n`` steps."""
        return EpochCarry(rows=steps * self.batch * self.env.world,
                          seconds=time.perf_counter() - self._t_epoch,
                          loss_sum=loss_mean * loss_n, loss_n=loss_n)

    def after_step(self, state: TrainState, steps: int, loss_mean) -> None:
        """Call after every optimiser step; ``steps``: steps of this epoch since it started (or
        was resumed); ``loss_mean() -> (global mean loss, steps)`` of those steps (collective,
        called only when saving). Saves every ``every_n_steps`` global steps."""
        state.samples_seen += self.batch * self.env.world
        n = self.spec.every_n_steps
        if not (n and state.step % n == 0):
            return
        part = self.epoch_part(steps, *loss_mean())
        c = state.carry
        carry = EpochCarry(c.rows + part.rows, c.seconds + part.seconds,
                           c.loss_sum + part.loss_sum, c.loss_n + part.loss_n)
        self._save_periodic(replace(state, rows_done=state.rows_done + part.rows, carry=carry))

    def finish_epoch_record(self, rec: dict, state: TrainState, steps: int) -> None:
        """Add the epoch's part trained before a resume (``state.carry``) to the loop's epoch
        record (in place): ``train_rows`` (global rows of the epoch), ``train_seconds``,
        ``train_samples_per_s``, ``train_loss``; adds ``train_rows_dropped`` (deterministic
        order: the tail no full global batch covers) and ``resumed_at_row``."""
        c = state.carry
        if c.loss_n:
            rec["train_loss"] = (c.loss_sum + rec["train_loss"] * steps) / (c.loss_n + steps)
        rec["train_rows"] += c.rows
        rec["train_seconds"] += c.seconds
        rec["train_samples_per_s"] = rec["train_rows"] / max(rec["train_seconds"], 1e-9)
        rec["resumed_at_row"] = state.rows_done
        if self.deterministic:
            rec["train_rows_dropped"] = self.order.num_rows - state.rows_done - \
                steps * self.batch * self.env.world

    def end_epoch(self, state: TrainState) -> None:
        """Checkpoint after the epoch's validation; ``state`` already points at the next epoch's
        start."""
        if self.spec.at_epoch_end:
            self._save_periodic(state)
