"""The losses inside the frameworks users train with: FSDP2, torch.compile, and the host syncs
that both care about."""

from __future__ import annotations

import warnings

import pytest
import torch

from epsdpo_kernels import AdaptiveBeta, EpsilonDPOOutput, epsilon_dpo_loss, linear_epsilon_dpo_loss
from tests.helpers.batches import head_case, make_batch, make_linear_batch, rank_rows, run_head
from tests.helpers.compare import assert_close
from tests.helpers.distributed import gloo_group, rendezvous_file
from tests.helpers.syncs import library_syncs

pytestmark = pytest.mark.xdist_group("multi_process")


def test_output_is_a_pytree_of_its_tensors():
    """Code that walks outputs for tensors (FSDP2's pre-backward hooks, torch.compile) sees
    every tensor field of EpsilonDPOOutput; β rides along as context."""
    import torch.utils._pytree as pytree

    policy, ref, labels = make_batch(2, 4, 30)
    out = epsilon_dpo_loss(policy.requires_grad_(), ref, labels, beta=0.2)
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 18 and all(isinstance(x, torch.Tensor) for x in leaves)
    assert any(x is out.loss for x in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, EpsilonDPOOutput) and rebuilt.beta == 0.2
    assert rebuilt.loss is out.loss


def _fsdp_worker(rank, world, store, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world, store):
        head, data = head_case()
        # The head sharded on its own, resharded after forward: its backward must gather the
        # weight again, which FSDP2 does only if it found the loss among the output's tensors.
        fully_shard(head, mesh=init_device_mesh("cpu", (world,)), reshard_after_forward=True)
        rows = rank_rows(rank, world)
        out = run_head(head, data, rows)
        assert isinstance(out, EpsilonDPOOutput)
        out.loss.backward()
        results[rank] = (
            head.lm_head.weight.grad.full_tensor().clone(),
            head.lm_head.bias.grad.full_tensor().clone(),
        )
        # Outside the module's forward the weight is a Shard(0) DTensor over ranks holding other
        # pairs: not a vocabulary-parallel head (whose ranks share the tokens); the API says so.
        try:
            linear_epsilon_dpo_loss(
                data["ref_hidden"][rows],
                head.lm_head.weight,
                data["ref_hidden"][rows],
                data["ref_weight"],
                data["labels"][rows],
                beta=0.1,
            )
            results[f"dtensor-{rank}"] = "no error"
        except ValueError as e:
            results[f"dtensor-{rank}"] = str(e)


def test_head_sharded_by_its_own_fsdp2_matches_one_process():
    """Two gloo ranks, LinearEpsilonDPOHead under its own fully_shard(reshard_after_forward=True):
    the gradients equal those of one process on all pairs."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_fsdp_worker, args=(2, rendezvous_file(), results), nprocs=2, join=True)

    head, data = head_case()
    run_head(head, data).loss.backward()
    for rank in (0, 1):
        weight_grad, bias_grad = results[rank]
        assert_close(
            weight_grad,
            head.lm_head.weight.grad,
            rtol=1e-5,
            atol=1e-7,
            name=f"weight grad, rank {rank}",
        )
        assert_close(
            bias_grad, head.lm_head.bias.grad, rtol=1e-5, atol=1e-7, name=f"bias grad, rank {rank}"
        )
        assert "is the weight FSDP-sharded over data-parallel ranks" in results[f"dtensor-{rank}"]


class _TinyModel(torch.nn.Module):
    def __init__(self, loss: str):
        super().__init__()
        self.body = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.loss = loss

    def forward(self, x, ref_hidden, labels, beta):
        hidden = torch.tanh(self.body(x))
        if self.loss == "linear":
            return linear_epsilon_dpo_loss(
                hidden,
                self.head.weight,
                ref_hidden,
                self.head.weight.detach(),
                labels,
                beta=beta,
                epsilon=0.1,
                backend="torch",
            ).loss
        ref_logits = self.head(ref_hidden).detach()
        return epsilon_dpo_loss(
            self.head(hidden), ref_logits, labels, beta=beta, epsilon=0.1, backend="torch"
        ).loss


@pytest.mark.parametrize("loss", ["linear", "logits"])
def test_compiled_model_trains_with_a_changing_beta_without_recompiling(loss):
    """torch.compile around a model whose forward calls the loss: the loss is one region dynamo
    does not trace (a documented graph break), β changes every step, and after the first
    change (which makes β a dynamic input) nothing recompiles. Losses equal eager's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    x, ref_hidden = torch.randn(4, 6, 16, generator=gen), torch.randn(4, 6, 16, generator=gen)
    labels = torch.randint(0, 50, (4, 6), generator=gen)

    def train(model, steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, graphs = [], []
        for step in range(steps):
            loss = model(x, ref_hidden, labels, 0.1 * (1 + 0.01 * step))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
            graphs.append(counters["stats"]["unique_graphs"])
        return losses, graphs

    torch.manual_seed(0)
    eager_losses, _ = train(_TinyModel(loss), 6)
    torch.manual_seed(0)
    compiled_losses, graphs = train(torch.compile(_TinyModel(loss)), 6)
    assert graphs[2] == graphs[-1], f"graphs compiled after each step: {graphs}"
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_losses[-1] < compiled_losses[0]


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_one_host_sync_per_call(path, device):
    """A training step's loss call (forward and backward, Triton backend), with the β
    controller observing its steps and its metrics formed, synchronises the host once:
    counting and checking the labels. Counted at every Python-level sync point our code could
    reach, and every ``torch.tensor`` it calls (from host data that is a blocking
    host-to-device copy on CUDA); on CUDA, torch's sync debug mode counts the rest, under the
    deterministic algorithms conftest turns on (whose CUDA scatters read sizes back)."""
    if path == "logits":
        policy, ref, labels = make_batch(2, 5, 40, device=device, seed=3)
        leaf = policy.requires_grad_()

        def step():
            out = epsilon_dpo_loss(leaf, ref, labels, beta=0.1, backend="triton")
            out.loss.backward()
            return out
    else:
        data = make_linear_batch(2, 5, 8, 40, dtype=torch.float32, device=device, bias=True)
        hidden = data["policy_hidden"].requires_grad_()

        def step():
            out = linear_epsilon_dpo_loss(
                hidden,
                data["policy_weight"],
                data["ref_hidden"],
                data["ref_weight"],
                data["labels"],
                beta=0.1,
                policy_bias=data["policy_bias"],
                ref_bias=data["ref_bias"],
                backend="triton",
            )
            out.loss.backward()
            return out

    controller = AdaptiveBeta(0.1, 0.01)
    cuda = device.type == "cuda"
    if cuda:  # torch reports every synchronising CUDA call as a warning
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, library_syncs() as calls:
            warnings.simplefilter("always")
            out = step()
            controller.observe(out.steps)
            out.metrics()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    assert calls == ["epsdpo_kernels.call.tolist"], calls
    if cuda:  # the loss call syncs once, where the count above says
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
