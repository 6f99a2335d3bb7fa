"""Scoring on the ranking model's shards (``recommend.scoring``): when the ranking model's
embedding tables do not fit one scoring process (``recommend.actor_memory_gb``), every rank of
a worker group (:mod:`rectrain.launch.sharded_recommend`: Ray Train, as training) builds the
model with its tables on ``meta``, shards it with TorchRec's DistributedModelParallel through
the training's own planning (:func:`rectrain.train.sharding.shard_model`: the same plan as
training at the same world size and budget) and loads the run's DCP checkpoint into its
shards (:func:`rectrain.checkpoint.load_checkpoint` reshards to any world size).

Only the ranker is sharded. Stage 1 (the retrieval run, its item vectors and index, the other
sources), the exclusions, the model batches and the top-k are those of the unsharded path and
the same code (:class:`~rectrain.serve.blocks.Recommender`): :class:`ShardedRecommender`
replaces only its model callable :meth:`~rectrain.serve.blocks.Recommender.score_chunk`.

The sharded forward is collective (all-to-all of the embeddings), so every rank runs the same
number of forward calls of the same batch size, by the protocol of the training's evaluation
(:func:`rectrain.data.loader.collective_batches`, ``mode="eval"``): before each forward the
ranks all-reduce (MAX) the pairs they hold; every rank pads its chunk to that many pairs
(padding pairs, whose scores are dropped), and a rank done with its blocks keeps stepping on
padding only (:meth:`ShardedRecommender.drain`) until every rank is done.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from rectrain.config.sections import RecommendSpec
from rectrain.models import task_of
from rectrain.models.base import label_prediction
from rectrain.serve.blocks import Recommender
from rectrain.serve.loading import LoadedModel, read_run

GiB = 2 ** 30
#: bytes per table value when unsharded: ``load_model`` builds fp32 tables whatever
#: ``sharding.embedding_dtype`` the run trained with
UNSHARDED_VALUE_BYTES = 4


def table_bytes(cfg, manifest: dict, value_bytes: int = UNSHARDED_VALUE_BYTES) -> int:
    """Bytes of a run's embedding-table weights, rows x dim x ``value_bytes`` summed over its
    EBC/EC tables (``FeatureLayout.ebc_tables`` / ``ec_tables``: rows from the manifest, dim
    from the model config); the table configs only, no tensor is allocated. Optimiser state
    is not counted (serving holds none)."""
    from rectrain.data.features import FeatureLayout

    layout = FeatureLayout(cfg, manifest)
    return sum(t.num_embeddings * t.embedding_dim
               for t in layout.ebc_tables() + layout.ec_tables()) * value_bytes


def world_of(spec: RecommendSpec, cfg) -> int:
    """Ranks of the sharded worker group: ``recommend.workers``, else the ranking run's
    ``train.num_workers`` (its training world size)."""
    return spec.workers or cfg.train.num_workers


def choose_scoring(spec: RecommendSpec) -> tuple[str, str]:
    """``("unsharded" | "sharded", why)`` for ``spec.ranking_run``, from its stored config and
    manifest only (no model built, no Ray). ``auto``: sharded when the ranking tables' bytes
    (:func:`table_bytes`, fp32 as the unsharded path holds them) exceed ``actor_memory_gb``
    GiB. A retrieval run as ``ranking_run`` is always unsharded (it serves through its
    index of item vectors, which every process holds).

    Raises:
        FileNotFoundError / ValueError: see :func:`rectrain.serve.loading.read_run`.
        ValueError: ``scoring: sharded`` with a retrieval ranking run; or ``auto`` picks
            sharded while ``explain`` is on (explanations need the unsharded model).
    """
    _, cfg, manifest = read_run(spec.ranking_run)
    if task_of(cfg.model.name) == "retrieval":
        if spec.scoring == "sharded":
            raise ValueError(f"recommend.scoring: sharded scores a ranking model on its shards; "
                             f"recommend.ranking_run {spec.ranking_run} is a {cfg.model.name} "
                             f"run (retrieval, served through its index): use scoring: auto "
                             f"or unsharded")
        return "unsharded", "a retrieval run is served whole through its index"
    nbytes = table_bytes(cfg, manifest)
    size = f"ranking tables {nbytes:,} bytes ({nbytes / GiB:.3g} GiB, fp32)"
    over = nbytes > spec.actor_memory_gb * GiB
    budget = f"actor_memory_gb {spec.actor_memory_gb:g}"
    workers = f"{world_of(spec, cfg)} workers"
    if spec.scoring == "sharded":
        return "sharded", f"scoring: sharded; {size}; {workers}"
    if spec.scoring == "unsharded":
        return "unsharded", f"scoring: unsharded; {size}"
    if not over:
        return "unsharded", f"{size} <= {budget}"
    if spec.explain:
        raise ValueError(f"recommend.explain: the {size} exceed {budget}, so they are scored "
                         f"sharded, and explanations need the unsharded model; set explain: 0, "
                         f"or raise recommend.actor_memory_gb (scoring: unsharded)")
    return "sharded", f"{size} > {budget}; {workers}"


def load_sharded(path: str, env) -> LoadedModel:
    """The ranking model of the checkpoint at ``path`` sharded over ``env``'s process group
    (collective: every rank calls it): built with tables on ``meta`` and dense layers on
    ``env.device``, sharded by :func:`rectrain.train.sharding.shard_model` with the run's
    ``sharding`` / ``optim`` / ``train`` sections (the training's plan; the optimiser is
    built for the plan's storage estimate only and dropped), then loaded from the DCP
    checkpoint (model state only), eval mode. ``meta["plan"]``: the plan as text.

    Raises:
        PlanError: the tables do not fit the training's memory budget on this world size.
        FileNotFoundError / ValueError: see :func:`rectrain.serve.loading.read_run`.
    """
    from rectrain.checkpoint import load_checkpoint
    from rectrain.data.features import FeatureLayout
    from rectrain.models import build_model
    from rectrain.train.sharding import shard_model

    url, cfg, manifest = read_run(path)
    layout = FeatureLayout(cfg, manifest)  # the run's table dtype: TBE returns fp32 rows
    model = build_model(layout, cfg.model, sparse_device=torch.device("meta"),
                        dense_device=env.device)
    with torch.enable_grad():  # the fused optimiser's hooks need autograd (Recommender: off)
        dmp, _, plan = shard_model(model, cfg.sharding, cfg.optim, env.device, cfg.train)
    meta = load_checkpoint(url, dmp)
    dmp.eval()
    return LoadedModel(model=dmp, layout=layout, cfg=cfg,
                       meta={**meta, "url": url, "plan": str(plan)})


class ShardedRecommender(Recommender):
    """A :class:`~rectrain.serve.blocks.Recommender` whose ranking model is the shards of
    ``env``'s rank (:func:`load_sharded`); its model callable is collective (see the module
    docstring). Build it, run blocks, then call :meth:`drain`, on every rank.

    Raises:
        ValueError: ``ranking_run`` is a retrieval run.
    """

    def __init__(self, spec: RecommendSpec, env, rows_per_chunk: int = 16384):
        self.env = env
        #: collective forward calls so far, real and padding-only
        self.forwards = 0
        super().__init__(spec, rows_per_chunk, loader=lambda p: load_sharded(p, env))
        if self.rank.retrieval:
            raise ValueError(f"recommend.scoring: {spec.ranking_run} is a retrieval run; "
                             f"sharded scoring is for ranking models")

    def _agree(self, pairs: int) -> int:
        # on env.device: an nccl group reduces CUDA tensors only
        t = torch.tensor([pairs], dtype=torch.int64, device=self.env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    @torch.no_grad()
    def _forward(self, u: np.ndarray, i: np.ndarray, n: int) -> np.ndarray:
        """Scores of pairs ``(u, i)`` from one collective forward of ``n >= len(u)`` pairs,
        the rest padding pairs (user row 0, item row 0: valid features) whose scores are
        dropped."""
        pad = np.zeros(n - len(u), np.int64)
        batch = self.rank.batch(np.concatenate([u, pad]), np.concatenate([i, pad]))
        s = label_prediction(self.rank.model(batch.to(self.env.device)),
                             self.rank.layout.regression)
        self.forwards += 1
        return s[:len(u)].float().cpu().numpy()

    def score_chunk(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Scores float32 ``[n]`` of ``n >= 1`` pairs: one collective forward, padded to the
        largest chunk of any rank in this step."""
        return self._forward(u, i, self._agree(len(u)))

    def drain(self) -> int:
        """Step on padding only until every rank has finished its blocks (collective);
        returns the padding-only forwards this rank ran."""
        empty, n_pad = np.zeros(0, np.int64), 0
        while (n := self._agree(0)):
            self._forward(empty, empty, n)
            n_pad += 1
        return n_pad


def score_rank(spec: RecommendSpec, out: str, blocks: list[tuple[int, int, int]], env,
               say=print) -> list[dict]:
    """This rank's share of ``blocks`` (``(block, lo, hi)``; block ``b`` goes to rank
    ``b % env.world``), scored on the model's shards and written as the unsharded path writes
    them (:func:`rectrain.serve.recommend.do_block`); collective. Returns the blocks' stats,
    the first with ``rank``, ``rank_blocks`` (how many), ``forwards`` / ``padding_forwards``
    (this rank's collective forwards, all of them / on padding only) and ``load_ms``. Rank 0 reports each block it
    finishes through ``say``."""
    from rectrain.serve.recommend import do_block

    t0 = time.perf_counter()
    rec = ShardedRecommender(spec, env)
    load_ms = int(1000 * (time.perf_counter() - t0))
    stats = []
    for b, lo, hi in blocks:
        if b % env.world != env.rank:
            continue
        stats.append(do_block(rec, out, b, lo, hi))
        if env.rank == 0:
            say(f"[rectrain] recommend rank 0 of {env.world}: block {b} ({hi - lo:,} users, "
                f"{stats[-1]['ms'] / 1000:.1f} s)", flush=True)
    n_pad = rec.drain()
    if stats:
        stats[0].update(rank=env.rank, rank_blocks=len(stats), forwards=rec.forwards,
                        padding_forwards=n_pad, load_ms=load_ms)
    return stats
