"""Correctness of every kernel on CUDA at the shapes users run, against float64, case by case.

    python -m benchmarks.cuda_check --jsonl check.jsonl            # on CUDA
    python -m benchmarks.cuda_check --jsonl check.jsonl --dry-run  # no GPU: tiny shapes

From the repository root: it reuses the test suite's comparisons (tests/helpers/), which the
install does not carry, so run it as a module (or with PYTHONPATH=$PWD, as the GPU campaign does).

The test suite checks the kernels at small shapes (and, without a GPU, through the interpreter);
this is the GPU campaign's check that the compiled kernels are right where users are: V ∈
{32000, 50257, 128256, 151936, 256000}, fp32/bf16/fp16, ``logits[:, :-1]`` views, packed streams,
vocabulary splits (few rows), ``inplace_backward``, a batch of more than 2^31 logits, and the
linear entry point. Each case's float64 reference is computed pair by pair on the device (no
rows × V float64 tensor), every field is compared with the test suite's error model
(tests/helpers/parity.py, with the fp32 rounding of sums over V and over a sequence's tokens
added for these sizes), and the gradient rows of the first and last pair are compared with the
float64 gradient. Each case's result is appended to the JSONL file as soon as it is known (a
case cut short by a time limit leaves the ones before it), with its largest errors, and with the
host synchronisations one forward + backward made (``torch.cuda.set_sync_debug_mode``; in a dry
run the package's read-backs, tests/helpers/syncs.py). Exit status: the number of failed cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings

BETA, EPSILON = 0.1, 0.01
VOCABS = (32000, 50257, 128256, 151936, 256000)
DTYPES = ("float32", "bfloat16", "float16")
# Pairs and tokens per sequence of the grid (2B·T = 2048 token rows: 2 GiB of fp32 logits at
# V = 256000), and of the case past 2^31 elements (8400 rows × 256000 = 2.15e9).
GRID_B, GRID_T = 4, 256
BIG_B, BIG_T = 4, 1050


def cases(dry_run: bool) -> list[dict]:
    """Most telling first: bf16 at every V, then the layouts, then the other dtypes."""
    vocabs = (300, 1000) if dry_run else VOCABS
    b, t = (2, 8) if dry_run else (GRID_B, GRID_T)
    mid = vocabs[len(vocabs) // 2]
    out = [dict(entry="logits", V=v, dtype="bfloat16", B=b, T=t) for v in vocabs]
    out += [
        dict(entry="logits", V=mid, dtype="bfloat16", B=b, T=t, layout="strided"),
        dict(entry="logits", V=mid, dtype="bfloat16", B=b, T=t, layout="packed"),
        dict(entry="logits", V=mid, dtype="bfloat16", B=b, T=t, inplace=True),
        # One or two scored rows: the forward splits each row's vocabulary over programs.
        dict(entry="logits", V=vocabs[-1], dtype="bfloat16", B=1, T=2),
        dict(entry="logits", V=vocabs[-1], dtype="float32", B=1, T=2),
        # (The linear reference and its gradients are computed on the CPU: few tokens.)
        dict(
            entry="linear",
            V=mid,
            dtype="bfloat16",
            B=2,
            T=max(2, t // 8),
            H=64 if dry_run else 2048,
        ),
        dict(
            entry="linear",
            V=vocabs[-1],
            dtype="float32",
            B=2,
            T=max(2, t // 8),
            H=64 if dry_run else 1024,
        ),
        # Gemma 2's soft cap: on the GPU its tanh runs on ex2.approx and an approximate divide,
        # which the interpreter does not (logits of several times the cap: tanh saturates).
        dict(
            entry="linear",
            V=vocabs[-1],
            dtype="bfloat16",
            B=2,
            T=max(2, t // 8),
            H=64 if dry_run else 1024,
            logit_softcap=2.0,
            spread=8.0,
        ),
    ]
    # Past 2^31 elements on the GPU (in a dry run, the same case at a tiny size).
    big = (2, 16) if dry_run else (BIG_B, BIG_T)
    out.append(
        dict(entry="logits", V=vocabs[-1], dtype="bfloat16", B=big[0], T=big[1], layout="big")
    )
    out += [
        dict(entry="logits", V=v, dtype=d, B=b, T=t)
        for d in DTYPES
        if d != "bfloat16"
        for v in vocabs
    ]
    for n, case in enumerate(out):
        case["name"] = "-".join(
            str(x)
            for x in (
                case["entry"],
                case["dtype"],
                f"V{case['V']}",
                f"{2 * case['B']}x{case['T']}",
                case.get("layout", ""),
                "inplace" if case.get("inplace") else "",
                f"softcap{case['logit_softcap']:g}" if "logit_softcap" in case else "",
            )
            if x
        )
        case["seed"] = n
    return out


# ----------------------------------------------------------------------------- one case
def _logits_batch(case, device):
    """Policy logits of realistic spread (std 3) with a prompt prefix and ragged padding; the
    reference is the policy plus noise, as after SFT. Generated on the device."""
    import torch

    b, t, v = case["B"], case["T"], case["V"]
    gen = torch.Generator(device).manual_seed(case["seed"])
    extra = 1 if case.get("layout") == "strided" else 0
    dtype = getattr(torch, case["dtype"])
    policy = torch.empty(2 * b, t + extra, v, device=device, dtype=dtype)
    ref = torch.empty(2 * b, t, v, device=device, dtype=dtype)
    for n in range(2 * b):  # row by row: no fp32 temporary of the whole batch
        row = 3 * torch.randn(t + extra, v, device=device, generator=gen)
        policy[n] = row
        ref[n] = row[:t] + 1.5 * torch.randn(t, v, device=device, generator=gen)
    labels = torch.randint(0, v, (2 * b, t), device=device, generator=gen)
    prompt = int(0.3 * t)
    labels[:, :prompt] = -100
    pad = torch.randint(0, max(1, (t - prompt) // 2 + 1), (2 * b,), device=device, generator=gen)
    labels[torch.arange(t, device=device) >= t - pad.view(-1, 1)] = -100
    return policy, ref, labels


def _reference_pairs(policy, ref, labels, pairs_with_grad, weights):
    """The float64 reference pair by pair (rows p and B+p); the float64 gradient of the
    objective with respect to the policy logits for the pairs in ``pairs_with_grad``."""
    import torch

    from epsdpo_kernels.reference import reference_epsilon_dpo

    b = labels.shape[0] // 2
    w_loss, w_losses, w_chosen, w_rejected = weights
    per_pair, grads = [], {}
    for p in range(b):
        rows = [p, b + p]
        h = policy[rows].double().requires_grad_(p in pairs_with_grad)
        e = reference_epsilon_dpo(h, ref[rows], labels[rows], beta=BETA, epsilon=EPSILON)
        if p in pairs_with_grad:
            objective = (
                (w_loss / b + float(w_losses[p])) * e["losses"][0]
                + float(w_chosen[p]) * e["chosen_logps"][0]
                + float(w_rejected[p]) * e["rejected_logps"][0]
            )
            objective.backward()
            grads[p] = h.grad.detach()
        per_pair.append({k: x.detach() for k, x in e.items()})
        del h, e
    counts = (labels != -100).sum(-1).double()
    expected = {
        k: torch.cat([e[k] for e in per_pair]).cpu()
        for k in per_pair[0]
        if k != "loss" and per_pair[0][k].dim() > 0
    }
    expected["loss"] = expected["losses"].mean()
    for key, half in (
        ("mean_chosen_logits", slice(0, b)),
        ("mean_rejected_logits", slice(b, None)),
    ):
        c = counts[half].cpu()
        means = torch.stack([e[key] for e in per_pair]).cpu()
        expected[key] = (means * c).sum() / c.sum().clamp(min=1)
    return expected, grads


def _max_errors(out, expected) -> dict:

    errors = {}
    for name in ("loss", "losses", "chosen_logps", "ref_chosen_logps", "logratios"):
        got = getattr(out, name).detach().double().cpu()
        want = expected[name].double()
        errors[name] = float((got - want).abs().max())
    errors["steps_differ"] = int((out.steps.cpu() != expected["steps"]).sum())
    return errors


def _syncs(step, device) -> int | list:
    """Host synchronisations of one call of ``step`` (forward + backward)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)  # before the explicit synchronize below
        torch.cuda.synchronize()
        return sum("synchroniz" in str(w.message) for w in caught)
    from tests.helpers.syncs import library_syncs

    with library_syncs() as calls:
        step()
    return calls


def run_logits_case(case, device) -> dict:
    import torch

    from epsdpo_kernels import epsilon_dpo_loss
    from tests.helpers.compare import grad_atol_floor, grad_rtol
    from tests.helpers.packing import pack
    from tests.helpers.parity import (
        check_outputs,
        fp32_sum_rel_error,
        grad_coef_atol,
        objective,
        on_device,
        upstream_weights,
    )

    policy_data, ref, labels = _logits_batch(case, device)
    b, t, v = case["B"], case["T"], case["V"]
    layout = case.get("layout")
    weights = upstream_weights(b)
    sampled = sorted({0, b - 1})
    base = policy_data[:, :t] if layout == "strided" else policy_data
    expected, grads64 = _reference_pairs(base, ref, labels, sampled, weights)

    packing = pack(labels.cpu(), seed=case["seed"]) if layout == "packed" else None
    leaf = (packing.stream(policy_data) if packing else policy_data).detach().requires_grad_()

    weights_on_device = on_device(weights, device)  # outside the counted call

    def step():
        source = leaf * 1 if case.get("inplace") else leaf  # in place needs a non-leaf
        kw = dict(
            beta=BETA, epsilon=EPSILON, inplace_backward=bool(case.get("inplace")), backend="triton"
        )
        if packing is not None:
            out = epsilon_dpo_loss(
                source,
                packing.stream(ref),
                packing.labels(labels),
                sequence_ids=packing.sequence_ids.to(device),
                num_pairs=packing.num_pairs,
                **kw,
            )
        else:
            logits = source[:, :-1] if layout == "strided" else source
            out = epsilon_dpo_loss(logits, ref, labels, **kw)
        objective(out, weights_on_device).backward()
        return out

    out = step()
    grad = leaf.grad
    leaf.grad = None
    syncs = _syncs(step, device)
    leaf.grad = None

    scored = (labels != -100).sum(-1).cpu().double()
    logps = torch.cat([expected["chosen_logps"], expected["rejected_logps"]]).abs()
    ref_logps = torch.cat([expected["ref_chosen_logps"], expected["ref_rejected_logps"]]).abs()
    # fp32 sums at this size: γ(V) per token's log-sum-exp (absolute), γ(n) over the n tokens.
    row_atol = fp32_sum_rel_error(v) * scored + torch.tensor(
        [fp32_sum_rel_error(int(n)) for n in scored], dtype=torch.float64
    ) * torch.maximum(logps, ref_logps)
    errors = _max_errors(out, expected)
    agree = check_outputs(out, expected, row_logp_atol=row_atol)

    dtype = policy_data.dtype
    if packing is not None:
        grad = packing.unstream(grad, (2 * b, t))
    elif layout == "strided":
        assert (grad[:, -1] == 0).all(), "gradient leaked into the column outside the view"
        grad = grad[:, :t]
    coef_atol = grad_coef_atol(expected, weights, labels.cpu(), {}) + grad_atol_floor(dtype)
    rtol = grad_rtol(dtype, "triton", device) + fp32_sum_rel_error(v)
    grad_err = 0.0
    for p in sampled:
        if not bool(agree[p]):
            continue  # a tie within rounding: the steps (and so the gradients) may differ
        rows = [p, b + p]
        want = grads64[p]
        got = grad[rows].double()
        atol = coef_atol[rows].to(device).view(-1, 1, 1)
        # On the device, elementwise: a CPU float64 copy of these rows would cost seconds.
        ratio = (got - want).abs() / (atol + rtol * want.abs())
        worst = float(ratio.max())  # NaN where either side is NaN: fails the comparison below
        if not worst <= 1.0:
            at = int(torch.nan_to_num(ratio, nan=float("inf")).argmax())
            raise AssertionError(
                f"grad of pair {p}: error {worst:.3g}× its tolerance at flat index {at} (got "
                f"{got.flatten()[at].item():.9g}, expected {want.flatten()[at].item():.9g}, "
                f"rtol {rtol:.3g})"
            )
        grad_err = max(grad_err, worst)
    _check_syncs(syncs)
    return dict(errors=errors, grad_err_over_tol=round(grad_err, 4), syncs=syncs)


def _check_syncs(syncs) -> None:
    """docs/API.md: one host synchronisation per call (the label scan)."""
    count = syncs if isinstance(syncs, int) else len(syncs)
    if count != 1:
        raise AssertionError(f"{count} host synchronisations in one call, documented: 1 ({syncs})")


def run_linear_case(case, device) -> dict:
    import torch

    from epsdpo_kernels import linear_epsilon_dpo_loss
    from tests.helpers.batches import make_linear_batch
    from tests.helpers.checks import compare_linear

    dtype = getattr(torch, case["dtype"])
    inputs = make_linear_batch(
        case["B"], case["T"], case["H"], case["V"], dtype=dtype, device=device, bias=False
    )
    for key in ("policy_hidden", "ref_hidden"):
        inputs[key] = inputs[key] * case.get("spread", 1.0)
    transform = {k: case[k] for k in ("logit_softcap",) if k in case}
    out = compare_linear(
        inputs, backend="triton", chunk_size=None, beta=BETA, epsilon=EPSILON, **transform
    )
    hidden = inputs["policy_hidden"].detach().requires_grad_()
    weight = inputs["policy_weight"].detach().requires_grad_()

    def step():
        linear_epsilon_dpo_loss(
            hidden,
            weight,
            inputs["ref_hidden"],
            inputs["ref_weight"],
            inputs["labels"],
            beta=BETA,
            epsilon=EPSILON,
            backend="triton",
            **transform,
        ).loss.backward()

    syncs = _syncs(step, device)
    _check_syncs(syncs)
    return dict(loss=float(out.loss.detach()), syncs=syncs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsonl", required=True, help="append one JSON line per case here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU tensors through Triton's interpreter, tiny shapes",
    )
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    from benchmarks.devices import benchmark_device

    device = benchmark_device(parser, args.dry_run)
    import torch

    failed = 0
    with open(args.jsonl, "a") as sink:
        for case in cases(args.dry_run):
            if args.only and args.only not in case["name"]:
                continue
            t0 = time.perf_counter()
            record = dict(case)
            try:
                run = run_linear_case if case["entry"] == "linear" else run_logits_case
                record.update(run(case, device), status="ok")
            except torch.cuda.OutOfMemoryError as e:
                record.update(status="skipped", reason=f"out of memory: {str(e)[:200]}")
            except Exception as e:  # a failed case is recorded, and the next one still runs
                failed += 1
                tb = traceback.format_exc().strip().splitlines()
                record.update(
                    status="FAIL", error=f"{type(e).__name__}: {str(e)[:600]}", at=tb[-3:]
                )
            record["seconds"] = round(time.perf_counter() - t0, 2)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            print(f"[check] {case['name']}: {record['status']} ({record['seconds']} s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"[check] {failed} failed", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
