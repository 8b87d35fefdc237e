"""Sequence parallelism (``sequence_group=``): gloo ranks each holding some tokens of every
sequence equal one process holding them all: the loss, every field and step on every rank, each
rank's gradient of its own tokens, weight gradients summed over the ranks, β carried by
``AdaptiveBeta``; and groups that disagree get a clear error on every rank."""

from __future__ import annotations

import pytest
import torch

from epsdpo_kernels import AdaptiveBeta, epsilon_dpo_loss, linear_epsilon_dpo_loss
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

BETA, EPSILON = 0.1, 0.2
# (entry, backend, dtype, layout, split). Layouts: padded (2B, T) rows, or a packed stream with
# sequences interleaved token by token and unscored fillers. Splits: contiguous blocks of
# positions (uneven: T = 7 over 2 or 3 ranks), context parallelism's load-balanced chunks (rank r
# holds chunks r and 2w−1−r), or every w-th token of a packed stream.
CASES = [
    ("logits", "torch", torch.float32, "padded", "blocks"),
    ("logits", "torch", torch.float32, "padded", "balanced"),
    ("logits", "torch", torch.bfloat16, "packed", "strided"),
    ("logits", "triton", torch.float32, "padded", "balanced"),
    ("logits", "triton", torch.float32, "packed", "strided"),
    ("linear", "torch", torch.float32, "padded", "blocks"),
    ("linear", "torch", torch.float32, "packed", "strided"),
    ("linear", "triton", torch.float32, "padded", "blocks"),
    # A soft-capped and scaled head: the transform is per token, the sums over ranks unchanged.
    ("linear", "torch", torch.float32, "packed", "balanced", dict(logit_softcap=2.0)),
    (
        "linear",
        "triton",
        torch.float32,
        "padded",
        "strided",
        dict(logit_softcap=2.0, logit_scale=0.5),
    ),
    # WPO's weights: per-token terms summed per sequence, completed over the group like the rest.
    ("logits", "triton", torch.float32, "packed", "balanced", dict(wpo_weights=True)),
    ("linear", "torch", torch.float32, "padded", "strided", dict(wpo_weights=True)),
]
B, T, V, H = 3, 7, 507, 16


def _case_id(case) -> str:
    entry, backend, dtype, layout, split = case[:5]
    transform = "".join(f"-{k.removeprefix('logit_')}{v:g}" for k, v in _transform(case).items())
    return f"{entry}-{backend}-{str(dtype).removeprefix('torch.')}-{layout}-{split}{transform}"


def _transform(case) -> dict:
    return case[5] if len(case) > 5 else {}


def _positions(split: str, n: int, rank: int, world: int) -> torch.Tensor:
    if split == "blocks":
        return torch.arange(n).tensor_split(world)[rank]
    if split == "balanced":
        chunks = torch.arange(n).tensor_split(2 * world)
        return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])
    return torch.arange(rank, n, world)


def _inputs(entry, dtype, layout):
    """The whole batch as one process sees it: (policy inputs, other inputs, packing kwargs);
    token positions are dimension 1 of every per-token tensor (the stream's, when packed)."""
    if entry == "logits":
        policy, ref, labels = make_batch(B, T, V, dtype=dtype, seed=3)
        policy_inputs, rest = dict(policy_logits=policy), dict(ref_logits=ref)
    else:
        data = make_linear_batch(B, T, H, V, dtype=dtype, device="cpu", bias=True, seed=3)
        labels = data.pop("labels")
        policy_inputs = {k: data.pop(k) for k in ("policy_hidden", "policy_weight", "policy_bias")}
        rest = data
    packing = {}
    if layout == "packed":
        stream = pack(labels, seed=5, mode="tokens", fillers=3)
        per_token = "policy_logits" if entry == "logits" else "policy_hidden"
        policy_inputs[per_token] = stream.stream(policy_inputs[per_token]).unsqueeze(0)
        other = "ref_logits" if entry == "logits" else "ref_hidden"
        rest[other] = stream.stream(rest[other]).unsqueeze(0)
        labels = stream.labels(labels).unsqueeze(0)
        packing = dict(sequence_ids=stream.sequence_ids.unsqueeze(0), num_pairs=stream.num_pairs)
    return policy_inputs, dict(rest, labels=labels), packing


def _call(case, positions=None, group=None, grad=True):
    """One call of the case's entry point on the tokens at ``positions`` (all when None):
    (fields, gradients of the policy inputs, β after one AdaptiveBeta step)."""
    entry, backend, dtype, layout, _ = case[:5]
    policy_inputs, rest, packing = _inputs(entry, dtype, layout)
    if positions is not None:
        per_token = ("policy_logits", "ref_logits", "policy_hidden", "ref_hidden", "labels")
        policy_inputs = {
            k: v[:, positions] if k in per_token else v for k, v in policy_inputs.items()
        }
        rest = {k: v[:, positions] if k in per_token else v for k, v in rest.items()}
        packing = {k: v[:, positions] if k == "sequence_ids" else v for k, v in packing.items()}
    for tensor in policy_inputs.values():
        tensor.requires_grad_(grad)
    fn = epsilon_dpo_loss if entry == "logits" else linear_epsilon_dpo_loss
    with torch.set_grad_enabled(grad):
        out = fn(
            **policy_inputs,
            **rest,
            **packing,
            beta=BETA,
            epsilon=EPSILON,
            backend=backend,
            sequence_group=group,
            **_transform(case),
        )
    if grad:
        out.loss.backward()
    beta = AdaptiveBeta(BETA, EPSILON)
    beta.observe(out.steps)
    beta.update()  # all-reduces over the default group: here, the sequence group's ranks
    fields = output_fields(out)
    grads = {k: v.grad.clone() for k, v in policy_inputs.items() if grad}
    return fields, grads, beta.beta


def _worker(rank, world, store, results):
    from torch.distributed.device_mesh import init_device_mesh

    with gloo_group(rank, world, store):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        for i, case in enumerate(CASES):
            if case[1] == "triton" and not interpreted():
                continue
            n = (
                T
                if case[3] == "padded"
                else _inputs(case[0], case[2], case[3])[1]["labels"].shape[1]
            )
            positions = _positions(case[4], n, rank, world)
            group = mesh["cp"] if i % 2 else mesh.get_group()  # a DeviceMesh or a ProcessGroup
            guarded(results, (i, rank), _call, case, positions, group)
        # Evaluation (no gradient) takes the same path.
        positions = _positions(CASES[1][4], T, rank, world)
        guarded(results, ("eval", rank), _eval_fields, positions, mesh)
        guarded(results, ("fsdp", rank), _fsdp_context_parallel, rank, world)
        if interpreted():  # the host syncs of one call and one β update (Triton backend)
            case = CASES[3]
            with library_syncs() as calls:
                _call(case, _positions(case[4], T, rank, world), mesh)
            results[("syncs", rank)] = calls

        # Ranks that disagree fail alike, before any kernel: the options, or the sequences.
        policy, ref, labels = make_batch(B, T, V, seed=3)
        errors = []
        for kwargs in (dict(beta=0.1 * (1 + rank)), dict(beta=0.1, policy_rows=2 * B + 2 * rank)):
            rows = kwargs.pop("policy_rows", 2 * B)
            source = make_batch(rows // 2, T, V, seed=3)
            try:
                epsilon_dpo_loss(*source, **kwargs, backend="torch", sequence_group=mesh)
            except ValueError as e:
                errors.append(str(e))
        grid = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))
        try:
            epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend="torch", sequence_group=grid)
        except ValueError as e:
            errors.append(str(e))
        try:
            epsilon_dpo_loss(policy, ref, labels, beta=0.1, backend="torch", sequence_group=rank)
        except TypeError as e:
            errors.append(str(e))
        results[("errors", rank)] = errors


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}ranks")
def ranks(request):
    """(world, results): every case on ``world`` gloo ranks, spawned once per world size."""
    return request.param, spawn_ranks(_worker, request.param)


def _eval_fields(positions, group):
    return _call(CASES[1], positions, group, grad=False)[0]


def _slice(case, grads_full, positions):
    per_token = {"policy_logits", "policy_hidden"}
    return {k: v[:, positions] for k, v in grads_full.items() if k in per_token}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_sequence_parallel_ranks_equal_one_process(ranks, case):
    if case[1] == "triton" and not interpreted():
        pytest.skip("the Triton backend runs on CPU tensors only under the interpreter")
    world, results = ranks
    i = CASES.index(case)
    fields, grads, beta = _call(case)
    _, backend, dtype, layout, split = case[:5]
    rtol = grad_rtol(dtype, backend, "cpu")
    n = T if layout == "padded" else _inputs(case[0], dtype, layout)[1]["labels"].shape[1]
    weight_sums = {}
    for rank in range(world):
        where = f"{case} rank {rank}/{world}"
        got_fields, got_grads, got_beta = result_of(results, (i, rank), where)
        assert torch.equal(got_fields["steps"], fields["steps"]), where
        assert got_fields.keys() == fields.keys(), where
        for name in fields:
            assert_close(got_fields[name], fields[name], **VALUE_TOL, name=f"{where} {name}")
        assert got_beta == pytest.approx(beta, rel=1e-12), where
        positions = _positions(split, n, rank, world)
        for name, grad in _slice(case, grads, positions).items():
            assert grad.abs().max() > 0, f"{where} {name}"
            assert_close(got_grads[name], grad, rtol=rtol, atol=1e-7, name=f"{where} {name}")
        for name in ("policy_weight", "policy_bias"):
            if name in got_grads:
                weight_sums[name] = weight_sums.get(name, 0) + got_grads[name].double()
    for name, total in weight_sums.items():
        assert_close(total, grads[name], rtol=1e-5, atol=1e-7, name=f"{case} Σ ranks {name}")


def test_evaluation_without_gradients_takes_the_same_path(ranks):
    world, results = ranks
    fields = _call(CASES[1], grad=False)[0]
    for rank in range(world):
        got = result_of(results, ("eval", rank), f"eval rank {rank}")
        assert got.keys() == fields.keys(), rank
        for name in fields:
            assert_close(got[name], fields[name], **VALUE_TOL, name=name)


def test_ranks_that_disagree_get_the_same_error(ranks):
    world, results = ranks
    for rank in range(world):
        beta, sequences, grid, not_a_group = results[("errors", rank)]
        assert "same sequences and options" in beta and "beta from 0.1 to" in beta
        assert f"sequences (2B) from {2 * B:g} to {2 * B + 2 * (world - 1):g}" in sequences
        assert "a DeviceMesh of 2 dimensions" in grid and "mesh['cp']" in grid
        assert "sequence_group must be a torch.distributed ProcessGroup" in not_a_group


def test_sequence_group_needs_an_initialised_process_group():
    policy, ref, labels = make_batch(B, T, V, seed=3)
    with pytest.raises(ValueError, match="sequence_group: torch.distributed is not initialised"):
        epsilon_dpo_loss(policy, ref, labels, beta=0.1, sequence_group=object())


class _ContextParallelPolicy(torch.nn.Module):
    """A decoder stand-in (one projection) and its lm_head in one FSDP2 root, as train/run.py
    holds them: FSDP gathers the head weight for the loss and reduce-scatters its gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.proj = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, ref_hidden, ref_weight, labels, group):
        return linear_epsilon_dpo_loss(
            torch.tanh(self.proj(x)),
            self.head.weight,
            ref_hidden,
            ref_weight,
            labels,
            beta=BETA,
            epsilon=EPSILON,
            backend="torch",
            sequence_group=group,
        )


def _cp_batch():
    data = make_linear_batch(B, T, H, V, dtype=torch.float32, device="cpu", bias=False, seed=8)
    return data["policy_hidden"], data["ref_hidden"], data["ref_weight"], data["labels"]


def _fsdp_context_parallel(rank, world):
    """This rank's full parameter gradients, FSDP2 over a (1 × world) data × context mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 shards over the whole (dp × cp) mesh, as torchtitan does; with dp = 1 that flattened
    # mesh is the context mesh itself.
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "cp"))
    policy = fully_shard(_ContextParallelPolicy(), mesh=mesh["cp"])
    x, ref_hidden, ref_weight, labels = _cp_batch()
    mine = _positions("balanced", T, rank, world)
    out = policy(x[:, mine], ref_hidden[:, mine], ref_weight, labels[:, mine], mesh["cp"])
    (out.loss * mesh["cp"].size()).backward()  # FSDP averages over dp·cp; the parts add
    return {n: p.grad.full_tensor().clone() for n, p in policy.named_parameters()}


def test_fsdp2_over_a_data_context_mesh_gives_the_batch_gradient_with_the_loss_scaled_by_cp(ranks):
    """docs/API.md's recipe: with FSDP2 averaging gradients over all dp·cp ranks, the loss scaled
    by the context-parallel size gives every parameter the single-process batch gradient."""
    world, results = ranks
    policy = _ContextParallelPolicy()
    x, ref_hidden, ref_weight, labels = _cp_batch()
    policy(x, ref_hidden, ref_weight, labels, None).loss.backward()
    for name, param in policy.named_parameters():
        assert param.grad.abs().max() > 0, name
        for rank in range(world):
            assert_close(
                result_of(results, ("fsdp", rank), f"rank {rank}")[name],
                param.grad,
                rtol=grad_rtol(torch.float32, "torch", "cpu"),
                atol=1e-7,
                name=f"rank {rank} {name}",
            )


def test_a_call_syncs_the_host_for_its_labels_and_for_the_groups_agreement(ranks):
    """Forward and backward on the Triton backend, then ``AdaptiveBeta.update``: the label
    scan, reading back the all-reduce that checks the ranks agree, and the β update's read of
    its all-reduced step sum; completing the sums is a collective the host does not wait for."""
    if not interpreted():
        pytest.skip("the Triton backend runs on CPU tensors only under the interpreter")
    world, results = ranks
    for rank in range(world):
        assert results[("syncs", rank)] == [
            "epsdpo_kernels.call.tolist",
            "epsdpo_kernels.distributed.agreement.tolist",
            "epsdpo_kernels.adaptive_beta.tolist",
        ], rank
