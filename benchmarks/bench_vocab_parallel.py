"""Vocabulary-parallel ε-DPO loss: per-rank peak memory and bytes communicated, 1 vs 2 vs 4 ranks.

Each configuration runs in fresh processes (gloo ranks on this machine's CPU, or one plain
process): ``linear_epsilon_dpo_loss`` forward and backward on S scored tokens with the lm_head
weight a DTensor sharded over the vocabulary (``Shard(0)``), hidden states replicated. Measured
per rank: the peak resident memory added by the loss call (Linux VmHWM after a reset, malloc
returning freed blocks at once) and the payloads handed to ``all_reduce`` and ``all_gather``
(every call counted, by wrapping them). The wire bytes of a ring all-reduce are 2·(n−1)/n times
its payload per rank; an all-gather brings each rank n − 1 times its payload.
The scaling model these numbers check is in benchmarks/RESULTS.md.

    python benchmarks/bench_vocab_parallel.py [--vocab 128256 256000] [--ranks 1 2 4]
        [--tokens 256] [--hidden 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER_TIMEOUT_S = 900


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _worker(cfg: dict) -> dict:
    """One rank (or the single process): build the inputs, reset the peak, run the loss."""
    import torch
    import torch.distributed as dist

    from epsdpo_kernels import linear_epsilon_dpo_loss

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg["ranks"])))
    ranks, vocab, tokens, hidden = cfg["ranks"], cfg["vocab"], cfg["tokens"], cfg["hidden"]
    distributed = ranks > 1
    if distributed:
        dist.init_process_group("gloo")
    gen = torch.Generator().manual_seed(0)
    pairs = max(1, tokens // 16)
    hidden_states = torch.randn(2 * pairs, 8, hidden, generator=gen)
    labels = torch.randint(0, vocab, (2 * pairs, 8), generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    ref_weight = weight + 0.01 * torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (ranks,))
        weight = distribute_tensor(weight, mesh, [Shard(0)])
        ref_weight = distribute_tensor(ref_weight, mesh, [Shard(0)])
    weight.requires_grad_()
    hidden_states.requires_grad_()

    payload = [0, 0, 0]  # all-reduce bytes, calls; all-gather bytes (each rank's own part)
    if distributed:
        all_reduce, all_gather = dist.all_reduce, dist.all_gather

        def counting_all_reduce(tensor, *args, **kwargs):
            payload[0] += tensor.numel() * tensor.element_size()
            payload[1] += 1
            return all_reduce(tensor, *args, **kwargs)

        def counting_all_gather(tensors, tensor, *args, **kwargs):
            payload[2] += tensor.numel() * tensor.element_size()
            payload[1] += 1
            return all_gather(tensors, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = counting_all_reduce, counting_all_gather
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts here: the inputs and the weight shard do not count
    before = _status_kb("VmRSS")
    out = linear_epsilon_dpo_loss(
        hidden_states, weight, hidden_states.detach() * 1.01, ref_weight, labels, beta=0.1
    )
    out.loss.backward()
    peak = (_status_kb("VmHWM") - before) * 1024
    result = dict(
        loss=float(out.loss),
        peak_extra_bytes=peak,
        all_reduce_payload_bytes=payload[0],
        all_gather_payload_bytes=payload[2],
        collective_calls=payload[1],
        scored_tokens=int((labels != -100).sum()),
        local_vocab=int(weight.to_local().shape[0]) if distributed else vocab,
    )
    if distributed:
        dist.destroy_process_group()
    return result


def _run(cfg: dict) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env.pop("TRITON_INTERPRET", None)
    script = str(Path(__file__).resolve())
    if cfg["ranks"] == 1:
        cmd = [sys.executable, script, "--worker", json.dumps(cfg)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={cfg['ranks']}",
            script,
            "--worker",
            json.dumps(cfg),
        ]
    with tempfile.TemporaryDirectory() as results:
        # Each rank writes its own file: ranks printing to one shared stdout pipe can interleave
        # their lines (seen once: two JSON results joined on one line).
        cmd[cmd.index("--worker") + 1] = json.dumps({**cfg, "result_dir": results})
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cfg}: worker failed:\n{proc.stderr[-3000:]}")
        files = sorted(Path(results).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        return [json.loads(p.read_text()) for p in files]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256, 256000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch (all scored)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size H")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        row = _worker(cfg)
        rank = os.environ.get("RANK", "0")
        Path(cfg["result_dir"], f"rank{rank}.json").write_text(json.dumps(row))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        print("error: the peak-memory measurement needs Linux /proc", file=sys.stderr)
        return 2
    if any(v < 1 for v in args.vocab) or any(r < 1 for r in args.ranks) or args.tokens < 16:
        print("error: --vocab and --ranks must be ≥ 1 and --tokens ≥ 16", file=sys.stderr)
        return 2

    rows = []
    print(
        f"{'V':>7} {'ranks':>5} {'peak MiB/rank':>13} {'all-reduce KiB/rank':>19} "
        f"{'B/token':>8} {'all-gather B/token':>18} {'calls':>5} {'logits gather B/token':>21}"
    )
    for vocab in args.vocab:
        for ranks in args.ranks:
            cfg = dict(vocab=vocab, ranks=ranks, tokens=args.tokens, hidden=args.hidden)
            results = _run(cfg)
            peak = max(r["peak_extra_bytes"] for r in results)
            payload = max(r["all_reduce_payload_bytes"] for r in results)
            gathered = max(r["all_gather_payload_bytes"] for r in results)
            tokens = results[0]["scored_tokens"]
            losses = {round(r["loss"], 6) for r in results}
            # What gathering each token's fp32 logits row from the other ranks would move.
            gather = 4 * vocab * (ranks - 1) / ranks
            row = dict(
                cfg,
                peak_extra_bytes_per_rank=peak,
                all_reduce_payload_bytes_per_rank=payload,
                payload_bytes_per_token=payload / tokens,
                all_gather_payload_bytes_per_rank=gathered,
                collective_calls=results[0]["collective_calls"],
                logits_gather_bytes_per_token=gather,
                losses=sorted(losses),
            )
            rows.append(row)
            print(
                f"{vocab:>7} {ranks:>5} {peak / 2**20:>13.1f} {payload / 2**10:>19.1f} "
                f"{payload / tokens:>8.0f} {gathered / tokens:>18.0f} "
                f"{row['collective_calls']:>5} {gather:>21.0f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
