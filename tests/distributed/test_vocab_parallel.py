"""Vocabulary parallelism: ``linear_epsilon_dpo_loss`` with the lm_head a DTensor sharded over
the vocabulary (Shard(0), as ColwiseParallel gives), and ``epsilon_dpo_loss`` with logits sharded
over it (Shard(-1)), on gloo ranks equal one process with the whole head or logits: the loss,
every field and step, each rank's weight, bias or logits gradient shard, the whole hidden-state
gradient on every rank; uneven and empty shards; bad placements and ranks holding different
tokens get clear errors."""

from __future__ import annotations

import pytest
import torch

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from tests.helpers.batches import make_batch, make_linear_batch
from tests.helpers.compare import VALUE_TOL, assert_close, grad_rtol
from tests.helpers.distributed import (
    gloo_group,
    guarded,
    interpreted,
    output_fields,
    result_of,
    spawn_ranks,
)
from tests.helpers.packing import pack
from tests.helpers.syncs import library_syncs

pytestmark = pytest.mark.xdist_group("multi_process")

# (backend, dtype, layout, V, reference weight: "sharded" DTensor or "plain" whole tensor,
# mesh: "1d" or "2d" (a (1, w) data × tensor mesh, sharded on "tp")). V = 301 splits unevenly
# over 2 and 3 ranks; V = 4 over 3 ranks leaves the last rank no rows at all.
CASES = [
    ("torch", torch.float32, "padded", 301, "sharded", "1d"),
    ("torch", torch.float32, "packed", 301, "plain", "2d"),
    ("torch", torch.bfloat16, "padded", 301, "sharded", "1d"),
    ("triton", torch.float32, "padded", 301, "sharded", "2d"),
    ("triton", torch.float32, "packed", 301, "plain", "1d"),
    ("torch", torch.float32, "padded", 4, "sharded", "1d"),
    # Soft-capped and scaled logits (Gemma 2, Cohere): each shard applies the transform.
    ("torch", torch.float32, "padded", 301, "sharded", "1d", dict(logit_softcap=2.0)),
    (
        "triton",
        torch.float32,
        "packed",
        301,
        "plain",
        "2d",
        dict(logit_softcap=2.0, logit_scale=0.5),
    ),
    # WPO's weights: the policy's Σ exp(2h) merges over the shards like its Σ exp(h).
    ("torch", torch.float32, "padded", 301, "sharded", "1d", dict(wpo_weights=True)),
    ("triton", torch.float32, "packed", 301, "plain", "2d", dict(wpo_weights=True)),
]
B, T, H = 2, 5, 16


def _runnable(case) -> bool:
    return case[0] == "torch" or interpreted()


def _case_id(case) -> str:
    backend, dtype, layout, vocab, ref_kind, mesh = case[:6]
    transform = "".join(f"-{k.removeprefix('logit_')}{v:g}" for k, v in _transform(case).items())
    return (
        f"{backend}-{str(dtype).removeprefix('torch.')}-{layout}-V{vocab}-ref_{ref_kind}-{mesh}"
        + transform
    )


def _transform(case) -> dict:
    return case[6] if len(case) > 6 else {}


def _inputs(case):
    _, dtype, layout, vocab, _, _ = case[:6]
    data = make_linear_batch(B, T, H, vocab, dtype=dtype, device="cpu", bias=True, seed=4)
    packing = {}
    if layout == "packed":
        stream = pack(data["labels"], seed=2, mode="tokens", fillers=2)
        for name in ("policy_hidden", "ref_hidden"):
            data[name] = stream.stream(data[name]).unsqueeze(0)
        data["labels"] = stream.labels(data["labels"]).unsqueeze(0)
        packing = dict(sequence_ids=stream.sequence_ids.unsqueeze(0), num_pairs=stream.num_pairs)
    return data, packing


def _call(case, mesh=None, labels_shift=0):
    """(fields, grads) of one call; with ``mesh``, the weights (and biases) are distributed over
    its "tp" dimension and the gradients returned are this rank's local shards."""
    backend, _, _, _, ref_kind, _ = case[:6]
    data, packing = _inputs(case)
    if labels_shift:
        data["labels"] = data["labels"].roll(labels_shift, dims=1)
    if mesh is not None:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        placements = [Shard(0)] if mesh.ndim == 1 else [Replicate(), Shard(0)]
        names = ["policy_weight", "policy_bias"]
        if ref_kind == "sharded":
            names += ["ref_weight", "ref_bias"]
        for name in names:
            data[name] = distribute_tensor(data[name], mesh, placements)
    for name in ("policy_hidden", "policy_weight", "policy_bias"):
        data[name].requires_grad_()
    out = linear_epsilon_dpo_loss(
        **data, **packing, beta=0.1, epsilon=0.2, backend=backend, chunk_size=4, **_transform(case)
    )
    out.loss.backward()
    fields = output_fields(out)
    grads = {}
    for name in ("policy_hidden", "policy_weight", "policy_bias"):
        grad = data[name].grad
        if hasattr(grad, "to_local"):
            assert grad.placements == data[name].placements, name
            grad = grad.to_local()
        grads[name] = grad.clone()
    return fields, grads


# (backend, dtype, layout, V, reference logits: "sharded" or "plain", mesh)
LOGITS_CASES = [
    ("torch", torch.float32, "padded", 301, "sharded", "1d"),
    ("torch", torch.bfloat16, "packed", 301, "plain", "2d"),
    ("triton", torch.float32, "packed", 301, "sharded", "1d"),
    ("torch", torch.float32, "padded", 4, "plain", "1d"),
]


def _call_logits(case, mesh=None):
    backend, dtype, layout, vocab, ref_kind, _ = case
    policy, ref, labels = make_batch(B, T, vocab, dtype=dtype, seed=6, scale=3.0)
    packing = {}
    if layout == "packed":
        stream = pack(labels, seed=1, mode="sequences", fillers=2)
        policy, ref = stream.stream(policy).unsqueeze(0), stream.stream(ref).unsqueeze(0)
        labels = stream.labels(labels).unsqueeze(0)
        packing = dict(sequence_ids=stream.sequence_ids.unsqueeze(0), num_pairs=stream.num_pairs)
    if mesh is not None:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        placements = [Shard(2)] if mesh.ndim == 1 else [Replicate(), Shard(2)]
        policy = distribute_tensor(policy, mesh, placements)
        if ref_kind == "sharded":
            ref = distribute_tensor(ref, mesh, placements)
    policy.requires_grad_()
    out = epsilon_dpo_loss(policy, ref, labels, **packing, beta=0.1, epsilon=0.2, backend=backend)
    out.loss.backward()
    fields = output_fields(out)
    grad = policy.grad
    if mesh is not None:
        assert grad.placements == policy.placements
        grad = grad.to_local()
    return fields, grad.clone()


def _worker(rank, world, store, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with gloo_group(rank, world, store):
        meshes = {
            "1d": init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)),
            "2d": init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp")),
        }
        for i, case in enumerate(CASES):
            if _runnable(case):
                guarded(results, (i, rank), _call, case, meshes[case[5]])
        for i, case in enumerate(LOGITS_CASES):
            if _runnable(case):
                guarded(results, ("logits", i, rank), _call_logits, case, meshes[case[5]])
        for backend in ("torch", "triton") if interpreted() else ("torch",):
            guarded(results, ("equal", backend, rank), _policy_as_reference, backend, meshes["1d"])
        if interpreted():  # the host syncs of one call (Triton backend: only the documented)
            with library_syncs() as calls:
                _call(CASES[3], meshes[CASES[3][5]])
            results[("syncs", rank)] = calls
        errors = []
        try:  # ranks holding different tokens, e.g. a weight FSDP-sharded over data ranks
            _call(CASES[0], meshes["1d"], labels_shift=rank)
        except ValueError as e:
            errors.append(str(e))
        data, _ = _inputs(CASES[0])
        data["policy_weight"] = distribute_tensor(data["policy_weight"], meshes["1d"], [Shard(1)])
        try:
            linear_epsilon_dpo_loss(**data, beta=0.1, backend="torch")
        except TypeError as e:
            errors.append(str(e))
        results[("errors", rank)] = errors


def _policy_as_reference(backend, mesh):
    """The policy passed as its own reference, its lm_head sharded: (steps, ℓ⁺ − ℓ, ℓ⁻ − ℓ)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    data = make_linear_batch(B, T, H, 301, dtype=torch.bfloat16, device="cpu", bias=False, seed=5)
    weight = distribute_tensor(data["policy_weight"], mesh, [Shard(0)])
    out = linear_epsilon_dpo_loss(
        data["policy_hidden"],
        weight,
        data["policy_hidden"],
        weight,
        data["labels"],
        beta=0.1,
        epsilon=0.3,
        backend=backend,
        chunk_size=3,
        logit_softcap=2.0,
    )
    return (
        out.steps.clone(),
        (out.p_epsilon_logratios - out.logratios).clone(),
        (out.n_epsilon_logratios - out.logratios).clone(),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_sharded_policy_as_its_own_reference_takes_exactly_no_step(ranks, backend):
    """The merged states of equal streams are equal bit for bit, and u − a in SPEC's form
    (ε·(h_y − g_y) − ((m⁺ − m) + ln(s⁺/s))) is then exactly 0: no step, on every rank."""
    if backend == "triton" and not interpreted():
        pytest.skip("the Triton backend runs on CPU tensors only under the interpreter")
    world, results = ranks
    for rank in range(world):
        steps, p_gap, n_gap = result_of(results, ("equal", backend, rank), f"rank {rank}")
        assert (steps == 0).all() and (p_gap == 0).all() and (n_gap == 0).all(), rank


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}ranks")
def ranks(request):
    """(world, results): every case on ``world`` gloo ranks, spawned once per world size."""
    return request.param, spawn_ranks(_worker, request.param)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_vocabulary_parallel_linear_ranks_equal_one_process(ranks, case):
    if not _runnable(case):
        pytest.skip("the Triton backend runs on CPU tensors only under the interpreter")
    world, results = ranks
    i = CASES.index(case)
    fields, grads = _call(case)
    backend, dtype, _, vocab, _, _ = case[:6]
    rtol = grad_rtol(dtype, backend, "cpu")
    per_rank = -(-vocab // world)
    for rank in range(world):
        where = f"{case} rank {rank}/{world}"
        got_fields, got_grads = result_of(results, (i, rank), where)
        assert torch.equal(got_fields["steps"], fields["steps"]), where
        assert got_fields.keys() == fields.keys(), where
        for name in fields:
            assert_close(got_fields[name], fields[name], **VALUE_TOL, name=f"{where} {name}")
        assert_close(
            got_grads["policy_hidden"],
            grads["policy_hidden"],
            rtol=rtol,
            atol=1e-7,
            name=f"{where} hidden",
        )
        rows = slice(min(vocab, rank * per_rank), min(vocab, (rank + 1) * per_rank))
        for name in ("policy_weight", "policy_bias"):
            assert_close(
                got_grads[name], grads[name][rows], rtol=rtol, atol=1e-7, name=f"{where} {name}"
            )
    assert grads["policy_weight"].abs().max() > 0


@pytest.mark.parametrize("case", LOGITS_CASES, ids=[_case_id(c) for c in LOGITS_CASES])
def test_vocabulary_sharded_logits_ranks_equal_one_process(ranks, case):
    if not _runnable(case):
        pytest.skip("the Triton backend runs on CPU tensors only under the interpreter")
    world, results = ranks
    i = LOGITS_CASES.index(case)
    fields, grad = _call_logits(case)
    backend, dtype, _, vocab, _, _ = case
    per_rank = -(-vocab // world)
    for rank in range(world):
        where = f"logits {case} rank {rank}/{world}"
        got_fields, got_grad = result_of(results, ("logits", i, rank), where)
        assert torch.equal(got_fields["steps"], fields["steps"]), where
        assert got_fields.keys() == fields.keys(), where
        for name in fields:
            assert_close(got_fields[name], fields[name], **VALUE_TOL, name=f"{where} {name}")
        columns = slice(min(vocab, rank * per_rank), min(vocab, (rank + 1) * per_rank))
        assert_close(
            got_grad,
            grad[..., columns],
            rtol=grad_rtol(dtype, backend, "cpu"),
            atol=1e-7,
            name=f"{where} grad",
        )


def test_ranks_with_other_tokens_or_placements_get_clear_errors(ranks):
    world, results = ranks
    for rank in range(world):
        different_tokens, bad_placement = results[("errors", rank)]
        assert "policy_weight: the ranks sharing the vocabulary-sharded lm_head" in different_tokens
        assert "label checksum from" in different_tokens
        assert "placements (Shard(dim=1),)" in bad_placement and "Shard(0)" in bad_placement


def test_a_call_syncs_the_host_for_its_labels_and_for_the_shards_agreement(ranks):
    """Forward and backward on the Triton backend: the label scan, and reading back the one
    all-reduce that checks the ranks agree; the merges and the hidden-gradient sum are
    collectives the host does not wait for."""
    if not interpreted():
        pytest.skip("the Triton backend runs on CPU tensors only under the interpreter")
    world, results = ranks
    for rank in range(world):
        assert results[("syncs", rank)] == [
            "epsdpo_kernels.call.tolist",
            "epsdpo_kernels.distributed.agreement.tolist",
        ], rank
