"""Markdown tables of the GPU node benchmark (:mod:`benchmarks.gpu.bench`'s result dict)."""

from __future__ import annotations


def _f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    """``bench.md``: machine and versions, the train-step table (samples/s, ratio to MLPerf's
    per-GPU DLRM-DCNv2 rate), input path rows/s, CPU worker scaling, each part's status."""
    P = res["parts"]
    env = P.get("env", {})
    v = env.get("versions", {})
    plan = res["plan"]
    out = [f"## GPU node benchmark ({res['mode']})", "",
           f"Machine: {env.get('cuda_device') or env.get('nvidia_smi') or 'no GPU'}, "
           f"{env.get('cpus')} CPUs; Python {v.get('python')}, torch {v.get('torch')}, "
           f"torchrec {v.get('torchrec')}, fbgemm-gpu {v.get('fbgemm_gpu')}. "
           f"Benchmark time {res.get('seconds', 0):.0f} s.", "",
           "### Train step (one process, world size 1)", "",
           "| workload | model | path | batch | samples/s | vs MLPerf per GPU |",
           "|---|---|---|---|---|---|"]
    mlperf = res["mlperf_per_gpu_samples_per_s"]
    for k in ("dlrm_b", "dlrm_a", "din_b", "din_a"):
        r = P.get(k)
        if r is None:
            continue
        cuda = r.get("device", plan["device"]) == "cuda"
        lab = (("(b) TorchRec DMP, " + ("nccl, CUDA TBE" if cuda else "gloo, CPU TBE")
                + ", fused row-wise Adagrad") if k.endswith("_b")
               else "(a) plain PyTorch nn.EmbeddingBag" + (" on CUDA" if cuda else ""))
        sps = r.get("samples_per_s")
        ratio = _f(sps / mlperf, "{:.3f}") if (sps and k.startswith("dlrm")) else "-"
        out.append(f"| {r.get('workload', k)} | {r.get('model', '-')} | {lab}"
                   f"{' + bf16 dense' if r.get('bf16') else ''} | {_f(r.get('batch'))} | "
                   f"{_f(sps)} | {ratio} |")
    out += ["", f"MLPerf Training DLRM-DCNv2 reference: about {mlperf / 1e6:.1f}M samples/s "
            "per H100/H200-class GPU (HugeCTR; about 2.9M on B200), for DCNv2 cross "
            "layers on Criteo 1TB's full tables; here: DLRM's dot interaction at the same "
            "MLP sizes, tables "
            f"{plan['criteo_max_rows']:,}-row-capped Criteo-shaped, dim {plan['emb_dim']}."]
    ing = P.get("ingest", {}).get("by_procs")
    if ing:
        out += ["", "### Input path: Parquet -> Batch (pyarrow read + to_batch), rows/s", "",
                "| processes | rows/s |", "|---|---|"]
        out += [f"| {n} | {_f(x['rows_per_s'])} |" for n, x in ing.items()]
    sc = P.get("scaling", {}).get("by_workers")
    if sc:
        out += ["", "### CPU worker scaling: TorchRec DMP on gloo, DIN, "
                f"batch {P['scaling'].get('batch_per_worker')} per worker", "",
                "| workers | threads/worker | global samples/s |", "|---|---|---|"]
        out += [f"| {w} | {x['threads_per_rank']} | {_f(x['samples_per_s'])} |"
                for w, x in sc.items()]
    out += ["", "### Parts", "", "| part | status | seconds |", "|---|---|---|"]
    out += [f"| {n} | {r['status']} | {r.get('part_seconds')} |" for n, r in P.items()]
    return "\n".join(out) + "\n"
