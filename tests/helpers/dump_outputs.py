"""Every output field and gradient of both entry points, for a refactor's before-and-after check.

    python -m tests.helpers.dump_outputs dump before.pt     # at the old commit
    python -m tests.helpers.dump_outputs dump after.pt      # at the new one
    python -m tests.helpers.dump_outputs compare before.pt after.pt

The dump covers both entry points × both backends (Triton through its CPU interpreter) × fp32/bf16 ×
padded/packed × plain and option-laden calls (ε > 0, label smoothing, averaging, token weights,
WPO, soft cap and scale, chunked linear slices, an in-place backward), each one process and, on
two gloo ranks, each sharded over the vocabulary and split over a sequence group. ``compare``
counts the tensors that are not bitwise equal (``torch.equal`` of values, dtypes and shapes;
NaNs at the same places count as equal) and exits 1 when any differs or is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as conftest does

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss  # noqa: E402
from tests.helpers.batches import make_batch, make_linear_batch  # noqa: E402
from tests.helpers.distributed import gloo_group, spawn_ranks  # noqa: E402
from tests.helpers.packing import pack  # noqa: E402

B, T, V, H = 2, 7, 507, 16
ENTRIES = ("logits", "linear")
BACKENDS = ("torch", "triton")
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("padded", "packed")
# "plain": ε-DPO's defaults; "options": every option a call can carry at once.
VARIANTS = ("plain", "options")
WORLD = 2


def _cases():
    return itertools.product(ENTRIES, BACKENDS, DTYPES, LAYOUTS, VARIANTS)


def _name(*parts) -> str:
    return "/".join(str(p).removeprefix("torch.") for p in parts)


def _inputs(entry, dtype, layout, variant):
    """(policy inputs, other inputs, keyword options) of one case, the whole batch."""
    if entry == "logits":
        policy, ref, labels = make_batch(B, T, V, dtype=dtype, seed=11)
        policy_inputs, rest = dict(policy_logits=policy), dict(ref_logits=ref)
        per_token = ("policy_logits", "ref_logits")
    else:
        data = make_linear_batch(B, T, H, V, dtype=dtype, device="cpu", bias=True, seed=11)
        labels = data.pop("labels")
        policy_inputs = {k: data.pop(k) for k in ("policy_hidden", "policy_weight", "policy_bias")}
        rest = data
        per_token = ("policy_hidden", "ref_hidden")
    options = dict(beta=0.1, epsilon=0.2)
    if variant == "options":
        gen = torch.Generator().manual_seed(5)
        options.update(label_smoothing=0.1, average_log_prob=True, wpo_weights=True)
        rest["token_weights"] = torch.rand(labels.shape, generator=gen) + 0.5
        if entry == "linear":
            options.update(logit_softcap=3.0, logit_scale=0.75, chunk_size=5, vocab_chunk_size=256)
        else:
            options.update(inplace_backward=True)
    if layout == "packed":
        stream = pack(labels, seed=5, mode="tokens", fillers=3)
        for name in per_token:
            holder = policy_inputs if name in policy_inputs else rest
            holder[name] = stream.stream(holder[name]).unsqueeze(0)
        if "token_weights" in rest:
            rest["token_weights"] = stream.stream(rest["token_weights"], fill=1.0).unsqueeze(0)
        labels = stream.labels(labels).unsqueeze(0)
        options.update(sequence_ids=stream.sequence_ids.unsqueeze(0), num_pairs=stream.num_pairs)
    rest["labels"] = labels
    return policy_inputs, rest, options


def _run(entry, backend, policy_inputs, rest, options, **extra) -> dict:
    """The output's every tensor field and the policy inputs' gradients, by name."""
    fn = epsilon_dpo_loss if entry == "logits" else linear_epsilon_dpo_loss
    leaves = {}
    for k, v in policy_inputs.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor) and not hasattr(v, "placements"):
            v = v.detach().clone()
        leaves[k] = v.requires_grad_(True)
    out = fn(**{**policy_inputs, **leaves}, **rest, **options, backend=backend, **extra)
    (out.loss * 1.5 + out.chosen_logps.sum() * 0.25).backward()
    result = {}
    for field in dataclasses.fields(out):
        value = getattr(out, field.name)
        if isinstance(value, torch.Tensor):
            result[field.name] = value.detach().clone()
    for k, v in leaves.items():
        grad = v.grad
        if hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        result[f"grad/{k}"] = grad.clone()
    return result


def dump_one_process() -> dict:
    results = {}
    for entry, backend, dtype, layout, variant in _cases():
        policy_inputs, rest, options = _inputs(entry, dtype, layout, variant)
        got = _run(entry, backend, policy_inputs, rest, options)
        prefix = _name("one", entry, backend, dtype, layout, variant)
        results.update({f"{prefix}/{k}": v for k, v in got.items()})
    return results


def _positions(n: int, rank: int) -> torch.Tensor:
    """Context parallelism's load-balanced split: rank r holds chunks r and 2w−1−r."""
    chunks = torch.arange(n).tensor_split(2 * WORLD)
    return torch.cat([chunks[rank], chunks[2 * WORLD - 1 - rank]])


def _rank_cases(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("group",))
    results = {}
    for entry, backend, dtype, layout, variant in _cases():
        # Vocabulary shards: the lm_head (Shard(0)) or the logits (Shard(-1)).
        policy_inputs, rest, options = _inputs(entry, dtype, layout, variant)
        if entry == "logits":
            policy_inputs["policy_logits"] = distribute_tensor(
                policy_inputs["policy_logits"], mesh, [Shard(2)]
            )
            rest["ref_logits"] = distribute_tensor(rest["ref_logits"], mesh, [Shard(2)])
        else:
            for name in ("policy_weight", "policy_bias"):
                policy_inputs[name] = distribute_tensor(policy_inputs[name], mesh, [Shard(0)])
            for name in ("ref_weight", "ref_bias"):
                rest[name] = distribute_tensor(rest[name], mesh, [Shard(0)])
        got = _run(entry, backend, policy_inputs, rest, options)
        prefix = _name("vocab", rank, entry, backend, dtype, layout, variant)
        results.update({f"{prefix}/{k}": v for k, v in got.items()})

        # A sequence group: this rank's tokens of every sequence.
        policy_inputs, rest, options = _inputs(entry, dtype, layout, variant)
        n = rest["labels"].shape[1]
        positions = _positions(n, rank)
        per_token = {"policy_logits", "ref_logits", "policy_hidden", "ref_hidden", "labels"}
        per_token |= {"token_weights", "sequence_ids"}
        policy_inputs = {
            k: v[:, positions] if k in per_token else v for k, v in policy_inputs.items()
        }
        rest = {k: v[:, positions] if k in per_token else v for k, v in rest.items()}
        options = {k: v[:, positions] if k in per_token else v for k, v in options.items()}
        got = _run(entry, backend, policy_inputs, rest, options, sequence_group=mesh)
        prefix = _name("sequence", rank, entry, backend, dtype, layout, variant)
        results.update({f"{prefix}/{k}": v for k, v in got.items()})
    return results


def _worker(rank, world, store, results):
    torch.set_num_threads(1)
    with gloo_group(rank, world, store):
        results[rank] = _rank_cases(rank)


def dump_ranks() -> dict:
    got = spawn_ranks(_worker, WORLD)
    return {k: v for rank in range(WORLD) for k, v in got[rank].items()}


def compare(before: dict, after: dict) -> list[str]:
    problems = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after or key not in before:
            problems.append(f"{key}: only in {'before' if key in before else 'after'}")
            continue
        a, b = before[key], after[key]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            same_nan = a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
            if same_nan and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)):
                continue
            problems.append(f"{key}: differs")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("path")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = parser.parse_args(argv)
    if args.command == "dump":
        torch.manual_seed(0)
        results = dump_one_process()
        results.update(dump_ranks())
        torch.save(results, args.path)
        print(f"{len(results)} tensors written to {args.path}")
        return 0
    before = torch.load(args.before)
    after = torch.load(args.after)
    problems = compare(before, after)
    for line in problems:
        print(line)
    print(f"{len(problems)} of {len(before.keys() | after.keys())} tensors differ or are missing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
