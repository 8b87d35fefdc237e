"""Bad input fails before any kernel runs, with an error naming the argument."""

from __future__ import annotations

import pytest
import torch

from epsdpo_kernels import epsilon_dpo_loss
from tests.helpers.batches import make_batch


def _good(device):
    policy, ref, labels = make_batch(2, 4, 11, device=device)
    return dict(policy_logits=policy, ref_logits=ref, labels=labels)


def _call(args, **kw):
    kw.setdefault("beta", 0.1)
    return epsilon_dpo_loss(args["policy_logits"], args["ref_logits"], args["labels"], **kw)


# One row per mistake, one line each: a table reads down its columns (fmt: skip keeps it so).
@pytest.mark.parametrize(
    "mutate, kw, error, match",
    [
        (lambda a: a.update(ref_logits=a["ref_logits"][:, :3]), {}, ValueError, "ref_logits must have the shape"),
        (lambda a: a.update(policy_logits=a["policy_logits"][:3], ref_logits=a["ref_logits"][:3], labels=a["labels"][:3]), {}, ValueError, "2B"),
        (lambda a: a.update(policy_logits=a["policy_logits"][0]), {}, ValueError, "policy_logits must have 3 dimensions"),
        (lambda a: a.update(labels=a["labels"].float()), {}, TypeError, "labels must be an integer tensor"),
        (lambda a: a.update(labels=a["labels"][:, :2]), {}, ValueError, "labels must have shape"),
        (lambda a: a["labels"].__setitem__((0, -1), 11), {}, ValueError, r"labels must be in \[0, V=11\)"),
        (lambda a: a["labels"].__setitem__((1, -1), -5), {}, ValueError, "labels must be in"),
        (lambda a: a.update(policy_logits=a["policy_logits"].double()), {}, TypeError, "policy_logits must be float32"),
        (lambda a: a.update(ref_logits=a["ref_logits"].long()), {}, TypeError, "ref_logits must be float32"),
        (lambda a: a.update(labels=a["labels"].tolist()), {}, TypeError, "labels must be a torch.Tensor"),
        (lambda a: None, dict(beta=0.0), ValueError, "beta must be"),
        (lambda a: None, dict(beta=-1.0), ValueError, "beta must be"),
        (lambda a: None, dict(beta=float("nan")), ValueError, "beta must be"),
        (lambda a: None, dict(beta=torch.tensor(0.1)), TypeError, "beta must be a Python float"),
        (lambda a: None, dict(epsilon=1.0), ValueError, "epsilon must be"),
        (lambda a: None, dict(epsilon=-0.1), ValueError, "epsilon must be"),
        (lambda a: None, dict(label_smoothing=0.5), ValueError, "label_smoothing must be"),
        (lambda a: None, dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (lambda a: None, dict(average_log_prob=1), TypeError, "average_log_prob must be a bool"),
        (lambda a: None, dict(backend="cuda"), ValueError, "backend must be one of"),
        (lambda a: None, dict(inplace_backward="yes"), TypeError, "inplace_backward must be a bool"),
    ],
    ids=[
        "shape-mismatch", "odd-rows", "ndim", "float-labels", "labels-shape", "label-too-large",
        "label-negative", "float64-logits", "integer-ref", "list-labels", "beta-zero",
        "beta-negative", "beta-nan", "beta-tensor", "epsilon-one", "epsilon-negative",
        "label-smoothing-half", "float-ignore-index", "int-average", "bad-backend", "inplace-str",
    ],
)  # fmt: skip
def test_bad_input_is_named(device, mutate, kw, error, match):
    args = _good(device)
    mutate(args)
    with pytest.raises(error, match=match):
        _call(args, **kw)


def test_mixed_devices_are_named():
    args = _good("cpu")
    args["labels"] = args["labels"].to("meta")
    with pytest.raises(ValueError, match="labels is on meta"):
        _call(args)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from epsdpo_kernels import params

    monkeypatch.setattr(params, "triton_interpreter_active", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        params.resolve_backend("triton", torch.device("cpu"))


def test_ignore_index_inside_vocab_is_allowed(device):
    """ignore_index may be a vocabulary entry: positions holding it are unscored, exactly as
    with -100."""
    args = _good(device)
    labels = args["labels"]
    labels[labels == 3] = 4  # no scored label is 3
    expected = _call(args)
    labels[labels == -100] = 3
    out = _call(args, ignore_index=3)
    assert torch.equal(out.losses, expected.losses) and torch.equal(out.steps, expected.steps)
    assert torch.equal(out.chosen_logps, expected.chosen_logps)
