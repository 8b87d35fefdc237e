"""A soft-capped Gemma 2 whose cap bites, on 2 and 3 gloo ranks: the vocabulary-parallel loss
(its lm_head a DTensor sharded over the vocabulary, Shard(0)) and the sequence-parallel loss
(each rank some of the token positions, ``sequence_group=``) on the model's own hidden states,
with the cap passed as ``logit_softcap``, equal ``epsilon_dpo_loss`` on the model's own capped
``.logits`` in one process: the loss, every field, and the gradient of every parameter, padded
and packed."""

from __future__ import annotations

import pytest
import torch

from epsdpo_kernels import epsilon_dpo_loss, linear_epsilon_dpo_loss
from tests.helpers.compare import assert_close
from tests.helpers.distributed import gloo_group, guarded, output_fields, result_of, spawn_ranks
from tests.helpers.models import tiny_transformed_lm

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multi_process")]

CAP = 0.5  # the logits reach a few units (weights × 4 below): the cap bites
BETA, EPSILON = 0.1, 0.3
CASES = [("vocab", "padded"), ("vocab", "packed"), ("sequence", "padded"), ("sequence", "packed")]


def _models_and_batch():
    model = tiny_transformed_lm("gemma2", final_logit_softcapping=CAP)
    for p in model.parameters():
        p.data.mul_(4)
    ref = tiny_transformed_lm("gemma2", final_logit_softcapping=CAP)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 301, (4, 9), generator=gen)  # 2 pairs: chosen, then rejected
    labels = input_ids[:, 1:].clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    return model, ref, input_ids, labels


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fields(out) -> dict:
    return output_fields(out)


def _one_process():
    """The model's own capped logits through epsilon_dpo_loss: (fields, parameter grads)."""
    model, ref, input_ids, labels = _models_and_batch()
    with torch.no_grad():
        ref_logits = ref(input_ids).logits[:, :-1]
    out = epsilon_dpo_loss(
        model(input_ids).logits[:, :-1], ref_logits, labels, beta=BETA, epsilon=EPSILON
    )
    out.loss.backward()
    return _fields(out), _grads(model)


def _hidden_states(model, ref, input_ids, labels, layout):
    """(policy hidden, reference hidden, labels, packing kwargs) as the loss takes them; packed:
    the four sequences run as one row (position_ids restarting at 0, no cache)."""
    with torch.no_grad():
        ref_hidden = ref.get_decoder()(input_ids).last_hidden_state[:, :-1]
    if layout == "padded":
        hidden = model.get_decoder()(input_ids).last_hidden_state[:, :-1]
        return hidden, ref_hidden, labels, {}
    rows, length = input_ids.shape
    positions = torch.arange(length).repeat(rows).view(1, -1)
    packed = model.get_decoder()(input_ids.view(1, -1), position_ids=positions, use_cache=False)
    # Each sequence's last hidden state scores nothing (its successor is another sequence's).
    hidden = packed.last_hidden_state.view(rows, length, -1)[:, :-1].reshape(1, -1, 32)
    ids = torch.arange(rows).repeat_interleave(length - 1).view(1, -1)
    packing = dict(sequence_ids=ids, num_pairs=rows // 2)
    return hidden, ref_hidden.reshape(1, -1, 32), labels.reshape(1, -1), packing


def _vocab_parallel(mesh, layout):
    """The lm_head (tied to the embedding) sharded over the vocabulary on ``mesh``: the
    embedding's part of the tied gradient comes through the decoder, the head's as the DTensor's
    gradient, gathered here only to compare."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model, ref, input_ids, labels = _models_and_batch()
    hidden, ref_hidden, labels, packing = _hidden_states(model, ref, input_ids, labels, layout)
    head = model.get_output_embeddings().weight
    weight = distribute_tensor(head.detach(), mesh, [Shard(0)]).requires_grad_()
    ref_weight = distribute_tensor(ref.get_output_embeddings().weight, mesh, [Shard(0)])
    out = linear_epsilon_dpo_loss(
        hidden,
        weight,
        ref_hidden,
        ref_weight,
        labels,
        beta=BETA,
        epsilon=EPSILON,
        logit_softcap=CAP,
        **packing,
    )
    out.loss.backward()
    grads = _grads(model)
    (head_name,) = [n for n, p in model.named_parameters() if p is head]
    head_grad = weight.grad.full_tensor()
    grads[head_name] = grads[head_name] + head_grad if head_name in grads else head_grad
    return _fields(out), grads


def _sequence_parallel(rank, world, layout):
    """Each rank the loss of some token positions (blocks of the row or stream), the model
    whole on every rank: each rank's parameter gradients are its positions' share, summed."""
    import torch.distributed as dist

    model, ref, input_ids, labels = _models_and_batch()
    hidden, ref_hidden, labels, packing = _hidden_states(model, ref, input_ids, labels, layout)
    mine = torch.arange(hidden.shape[1]).tensor_split(world)[rank]
    if "sequence_ids" in packing:
        packing["sequence_ids"] = packing["sequence_ids"][:, mine]
    out = linear_epsilon_dpo_loss(
        hidden[:, mine],
        model.get_output_embeddings().weight,
        ref_hidden[:, mine],
        ref.get_output_embeddings().weight,
        labels[:, mine],
        beta=BETA,
        epsilon=EPSILON,
        logit_softcap=CAP,
        sequence_group=dist.group.WORLD,
        **packing,
    )
    out.loss.backward()
    grads = _grads(model)
    for grad in grads.values():
        dist.all_reduce(grad)
    return _fields(out), grads


def _worker(rank, world, store, results):
    from torch.distributed.device_mesh import init_device_mesh

    with gloo_group(rank, world, store):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        for kind, layout in CASES:
            if kind == "vocab":
                guarded(results, (kind, layout, rank), _vocab_parallel, mesh, layout)
            else:
                guarded(results, (kind, layout, rank), _sequence_parallel, rank, world, layout)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"{world}ranks")
def ranks(request):
    return request.param, spawn_ranks(_worker, request.param)


@pytest.fixture(scope="module")
def one_process():
    return _one_process()


@pytest.mark.parametrize("kind, layout", CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_a_soft_capped_model_on_ranks_equals_its_own_logits_in_one_process(
    ranks, one_process, kind, layout
):
    world, results = ranks
    fields, grads = one_process
    assert grads and all(g.abs().max() > 0 for g in grads.values())
    for rank in range(world):
        where = f"{kind} {layout} rank {rank}/{world}"
        got_fields, got_grads = result_of(results, (kind, layout, rank), where)
        assert torch.equal(got_fields["steps"], fields["steps"]), where
        assert got_fields.keys() == fields.keys(), where
        for name in fields:
            assert_close(
                got_fields[name], fields[name], rtol=1e-5, atol=1e-5, name=f"{where} {name}"
            )
        assert got_grads.keys() == grads.keys(), where
        for name, grad in grads.items():
            assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, name=f"{where} {name}")
