"""ε-DPO in TRL: ``EpsilonDPOConfig`` and ``EpsilonDPOTrainer``, on the fused linear loss.

A drop-in for TRL's ``DPOConfig``/``DPOTrainer`` (tested with the TRL versions the ``trl`` extra
pins). Everything TRL does around the loss (dataset preparation, collation, the reference model
or PEFT adapter switching, distributed wrapping, logging, checkpointing) is TRL's own; this module
replaces the loss with ``linear_epsilon_dpo_loss`` on the last hidden states and lm_head weights,
so no ``tokens × vocab`` tensor exists in a step, and carries β across optimizer steps.

Options the fused ε-DPO loss cannot honour are refused when the config or the trainer is built,
with the reason and what to use instead; see ``refused_options``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import DPOConfig, DPOTrainer

from .adaptive_beta import AdaptiveBeta
from .engines import run_as_forward, whole_head, whole_parameters
from .hugging_face import check_same_transform, logit_transform
from .linear_loss import linear_epsilon_dpo_loss
from .loss_types import (
    LENGTH_NORMALISED,
    LOSS_TYPES,
    check_loss_type,
    preference_losses,
    with_reference_logps,
)
from .params import check_beta, check_epsilon, check_label_smoothing

BETA_STATE_FILE = "epsilon_dpo_beta.json"

# A dataset with these columns is already tokenized pairs and is used as it is.
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# The output's fields with a gradient: the ones the loss returns through the engines' hooks.
_DIFFERENTIABLE = ("loss", "losses", "chosen_logps", "rejected_logps")
# Logged metrics that are one value per micro-batch (averaged over batches, not pairs).
_PER_BATCH = ("kl/beta", "aux_loss")


@dataclass
class EpsilonDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` plus ``epsilon``, ε-DPO's step size for the per-pair KL coefficient.

    ``beta`` is the initial β; it then moves by β ← β / (1 + ε·mean(s)) after every optimizer
    step. Every TRL 1.16 ``loss_type`` (and lists of them with ``loss_weights``) and
    ``f_divergence_type`` is TRL's formula with each pair's β̃ = β/(1+ε·s) for β
    (``epsdpo_kernels.preference_losses``); at ε = 0 each is TRL's. ``label_smoothing`` is
    conservative DPO (cDPO) on the sigmoid losses, as in the ε-DPO authors' trainer (TRL 1.x's
    own ``sigmoid`` ignores it), and TRL's meaning for ``robust``, ``exo_pair`` and ``aot*``.
    ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1.0, α]`` adds α times the chosen
    responses' NLL (RPO), as in TRL. ``use_weighting=True`` weights every term by WPO's
    per-pair weights, computed in the loss's one vocabulary pass (``wpo_weights=True``).
    ``padding_free=True`` trains packed rows (``DataCollatorForPackedPreference``), which TRL
    1.16's own ``DPOTrainer`` switches off.
    """

    epsilon: float = field(
        default=0.01,
        metadata={
            "help": "ε-DPO's step size: each pair's KL coefficient is β/(1+ε·s) with s ∈ {-1, 0, "
            "+1}, and β ← β/(1+ε·mean(s)) after every optimizer step. 0 gives plain DPO."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_options(self)


def refused_options(args: DPOConfig) -> list[str]:
    """Why each set option cannot be honoured by the fused ε-DPO loss (empty when all can)."""
    problems = []
    if args.precompute_ref_log_probs and getattr(args, "epsilon", 0.0) > 0:
        problems.append(
            "precompute_ref_log_probs=True with epsilon > 0: ε-DPO needs the reference's whole "
            "next-token distribution at every scored token (its perturbed policies mix the two "
            "models' logits), not its sequence log-probs; keep precompute_ref_log_probs=False "
            "(the reference forward costs no logits memory here), or epsilon=0 (plain DPO)"
        )
    loss_types = list(args.loss_type)
    unknown = [t for t in loss_types if t not in LOSS_TYPES and t != "sft"]
    if unknown:
        problems.append(
            f"loss_type={loss_types}: {unknown} not among TRL 1.16's loss types "
            f"{[*LOSS_TYPES, 'sft']}"
        )
    for loss_type in (t for t in loss_types if t in LOSS_TYPES):
        try:
            check_loss_type(
                loss_type,
                f_divergence_type=args.f_divergence_type,
                f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                label_smoothing=args.label_smoothing,
                discopop_tau=args.discopop_tau,
            )
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if args.ld_alpha is not None and "sft" in loss_types:
        problems.append(
            f"ld_alpha={args.ld_alpha} with loss_type 'sft': the fused loss returns the "
            "length-desensitised (weighted) sums only, and TRL's SFT term is the unweighted "
            "NLL; use one of them"
        )
    problem = parallelism_problem(getattr(args, "parallelism_config", None))
    if problem:
        problems.append(problem)
    # The loss's own checks, so that the config says what the loss would say.
    for check, value in (
        (check_beta, args.beta),
        (check_epsilon, getattr(args, "epsilon", 0.0)),
        (check_label_smoothing, args.label_smoothing),
    ):
        try:
            check(value)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    return list(dict.fromkeys(problems))  # one loss type's checks repeat the scalar ones


def parallelism_problem(parallelism) -> str | None:
    """Why an accelerate ``ParallelismConfig`` with tensor, context or sequence parallelism is
    refused (None for data parallelism alone, or none)."""
    split = {
        name: size
        for name in ("tp_size", "cp_size", "sp_size")
        if (size := getattr(parallelism, name, 1) or 1) > 1
    }
    if not split:
        return None
    sizes = ", ".join(f"{name}={size}" for name, size in split.items())
    return (
        f"parallelism_config with {sizes}: tensor parallelism splits the lm_head over the "
        "vocabulary and context/sequence parallelism splits every sequence over ranks, and "
        "this trainer would sum each rank's part as if it were the whole sequence; use data "
        "parallelism only (dp_replicate_size, dp_shard_size). accelerate runs these meshes "
        "only on GPUs (it refuses a ParallelismConfig on CPU processes), so this path has "
        "no test yet; outside the trainer, linear_epsilon_dpo_loss takes a vocabulary-"
        "sharded lm_head (DTensor Shard(0)) and sequence_group= (tested on CPU)"
    )


def check_options(args: DPOConfig) -> None:
    problems = refused_options(args)
    if problems:
        raise ValueError("EpsilonDPOConfig: " + "; ".join(problems))


@dataclass
class DataCollatorForPackedPreference:
    """Padding-free preference batches: every sequence of the batch, whole, in one row.

    Takes the examples TRL's ``DataCollatorForPreference`` takes (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``) and truncates each sequence as it does (``max_length``,
    ``truncation_mode``), then concatenates them, chosen sequences first: sequence ``n < P`` is
    the chosen response of pair ``n``, ``n ≥ P`` the rejected one of pair ``n − P`` (P pairs), as
    the padded batch's rows. Returns ``input_ids``, ``position_ids`` (restarting at 0 for each
    sequence, from which transformers keeps attention inside each sequence), ``completion_mask``
    and ``sequence_ids``, each of shape ``(1, N)`` with N the batch's real tokens, and
    ``num_pairs``; there is no attention mask. With ``pad_to_multiple_of``, the row is filled
    up with ``pad_token_id`` tokens of sequence id -1 that are never scored.
    """

    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"truncation_mode={self.truncation_mode!r}: expected 'keep_start' or 'keep_end'"
            )
        if self.pad_to_multiple_of is not None and self.pad_token_id is None:
            raise ValueError("pad_to_multiple_of needs pad_token_id (the filler token)")

    def _truncate(self, values: list[int]) -> list[int]:
        if self.max_length is None:
            return values
        return (
            values[: self.max_length]
            if self.truncation_mode == "keep_start"
            else values[-self.max_length :]
        )

    def __call__(self, examples: list[dict]) -> dict:
        input_ids, completion_mask, position_ids, sequence_ids = [], [], [], []
        sides = ("chosen_ids", "rejected_ids")
        for n, (side, example) in enumerate((s, e) for s in sides for e in examples):
            prompt, completion = list(example["prompt_ids"]), list(example[side])
            ids = self._truncate(prompt + completion)
            input_ids += ids
            completion_mask += self._truncate([0] * len(prompt) + [1] * len(completion))
            position_ids += range(len(ids))
            sequence_ids += [n] * len(ids)
        if self.pad_to_multiple_of is not None:
            filler = -len(input_ids) % self.pad_to_multiple_of
            input_ids += [self.pad_token_id] * filler
            completion_mask += [0] * filler
            position_ids += range(filler)
            sequence_ids += [-1] * filler

        def row(values):
            return torch.tensor(values, dtype=torch.long).reshape(1, -1)

        batch = {
            "input_ids": row(input_ids),
            "position_ids": row(position_ids),
            "completion_mask": row(completion_mask),
            "sequence_ids": row(sequence_ids),
            "num_pairs": len(examples),
        }
        # precompute_ref_log_probs: the reference's sums, one per pair, as TRL's collator has them.
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(e[key]) for e in examples])
        return batch


def _hidden_state_forward(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` for the fused loss, which never forms the logits:
    ``model(..., epsdpo_head=f)`` runs the backbone and returns ``f(hidden, lm_head)`` (a tuple
    of tensors) with the MoE load-balancing loss (or None) after it.

    ``f`` runs inside the model's forward, where every engine expects the model's parameters to
    be used: FSDP's root unit is unsharded there, and FSDP and ZeRO-3 attach their
    before-backward gathering to the forward's outputs. The policy's ``f`` runs the loss as the
    lm_head's forward (``engines.run_as_forward``), so the head's own hooks gather it too; the
    reference's keeps its hidden states and head aside and returns nothing, so no engine or
    mixed-precision wrapper touches them on the way out.

    Going through ``model.forward`` (rather than calling the backbone directly) keeps DDP,
    FSDP, DeepSpeed and PEFT wrappers in the path. The backbone and the head are looked up on
    every call because FSDP and PEFT replace them after patching. Any other call is the forward
    as it was (TRL's fused head, generation). With ``output_router_logits=True`` (an MoE
    policy) the load-balancing loss is computed as the model's own forward computes it.
    """
    wrapped = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, epsdpo_head=None, **kwargs):
        if epsdpo_head is None:
            return wrapped(*args, **kwargs)
        kwargs["use_cache"] = False
        outputs = self.base_model(*args, **kwargs)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = router_aux_loss(self)(
                outputs.router_logits,
                self.num_experts,
                self.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
        return (*epsdpo_head(outputs.last_hidden_state, self.get_output_embeddings()), aux_loss)

    model.forward = forward.__get__(model)


def _bias(head: torch.nn.Module) -> torch.Tensor | None:
    return getattr(head, "bias", None)


def router_aux_loss(model):
    """The load-balancing loss function an MoE causal LM's forward adds to its loss
    (``load_balancing_loss_func`` of its modeling module, called with the model's
    ``num_experts`` and ``num_experts_per_tok``, as Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS and the
    other transformers MoE families do), or a ``ValueError`` naming what is missing."""
    import sys

    module = sys.modules.get(type(model).__module__)
    function = getattr(module, "load_balancing_loss_func", None)
    missing = [name for name in ("num_experts", "num_experts_per_tok") if not hasattr(model, name)]
    if function is None or missing:
        what = "load_balancing_loss_func in its module" if function is None else missing
        raise ValueError(
            f"router_aux_loss_coef: {type(model).__name__} has no {what}, so the trainer cannot "
            "compute its load-balancing loss as the model's forward does; set "
            "router_aux_loss_coef=0.0"
        )
    return function


def ld_token_weights(labels, sequence_ids, num_pairs, alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights (TRL's ``ld_alpha``), in the labels' layout: 1 on each
    response's first ``min(len_chosen, len_rejected)`` scored tokens, ``alpha`` on the rest, so
    that the longer response's tail is down-weighted. Padded rows (sequence n = row n) or a
    packed row with ``sequence_ids`` and ``num_pairs`` (a sequence's tokens in stream order,
    anywhere in the row). Device ops only: no host synchronisation."""
    scored = (labels != -100).reshape(-1)
    rows = labels.shape[0]
    if sequence_ids is None:
        ids = torch.arange(rows, device=labels.device).repeat_interleave(labels.shape[1])
        count = rows
    else:
        ids = sequence_ids.reshape(-1).long()
        count = 2 * num_pairs
    keys = torch.where(scored & (ids >= 0) & (ids < count), ids, count)
    runs = torch.bincount(keys, minlength=count + 1)
    starts = torch.cumsum(runs, 0) - runs
    order = torch.argsort(keys, stable=True)
    position = torch.empty_like(keys)  # 1-based among its sequence's scored tokens
    position[order] = torch.arange(1, keys.numel() + 1, device=keys.device) - starts[keys[order]]
    lengths = runs[:count]
    shared = torch.minimum(lengths[: count // 2], lengths[count // 2 :]).repeat(2)
    shared = torch.cat([shared, shared.new_zeros(1)])[keys]
    weights = torch.where(position <= shared, 1.0, float(alpha))
    return torch.where(scored, weights, 0.0).reshape(labels.shape)


class EpsilonDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the ε-DPO loss computed by ``linear_epsilon_dpo_loss``.

    Same constructor and datasets as ``DPOTrainer``; pass an ``EpsilonDPOConfig``. The
    reference is ``ref_model``, else (full fine-tuning) a fresh copy of the policy loaded by
    TRL, else (PEFT) the policy with its adapter disabled. β is an ``AdaptiveBeta``
    (``trainer.adaptive_beta``) updated once per optimizer step over every micro-batch and
    process, saved with each checkpoint and restored by ``train(resume_from_checkpoint=...)``.
    TRL's options around the loss are TRL's (``sync_ref_model``, ``ld_alpha`` as
    ``token_weights``, an MoE's ``router_aux_loss_coef``, ``compute_metrics``, and
    ``precompute_ref_log_probs`` at ε = 0); ``refused_options`` says why the rest are not.

    Logged (``eval_``-prefixed on evaluation): TRL's ``loss``, ``rewards/*``, ``logps/*``,
    ``logits/*``, ``aux_loss`` (MoE); ε-DPO's ``kl/beta``, ``kl/p_epsilon_steps``,
    ``kl/n_epsilon_steps``, ``kl/avg_steps``; and ``displacement/*`` (see
    ``EpsilonDPOOutput.pair_metrics``). TRL's ``entropy`` and ``mean_token_accuracy`` are not:
    they need per-token vocabulary reductions the fused loss does not compute.
    """

    _tag_names = ["trl", "dpo", "epsilon-dpo", "epsdpo-kernels"]
    _name = "ε-DPO"

    def __init__(self, model, ref_model=None, args: EpsilonDPOConfig | None = None, **kwargs):
        if args is None:  # as DPOTrainer: a default config named after the model
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = EpsilonDPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-EpsilonDPO")
        if not isinstance(args, EpsilonDPOConfig):
            raise TypeError(
                "args must be an EpsilonDPOConfig (TRL's DPOConfig plus epsilon), got "
                f"{type(args).__name__}"
            )
        check_options(args)
        # TRL 1.16 turns padding_free off with a warning (its loss cannot take packed rows);
        # the fused loss can, so it is kept off only while DPOTrainer is built.
        padding_free, args.padding_free = args.padding_free, False
        try:
            super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        finally:
            args.padding_free = padding_free
        self.padding_free = padding_free
        self._check_parallelism()
        if self._is_vision_dataset:
            raise ValueError(
                "train_dataset has images: EpsilonDPOTrainer supports text-only causal LMs"
            )
        policy = self._unwrapped_policy()
        if self.aux_loss_enabled:
            router_aux_loss(policy)  # refused here, not at the first step
        # Soft-capped or scaled logits (Gemma 2, Cohere, Granite, ...): the loss applies the
        # model's own transform where its kernels read the logits, as TRL's fused head does.
        self._logit_transform = logit_transform(policy.config.get_text_config())
        if padding_free:
            self._use_packed_batches(kwargs.get("data_collator"))
        _hidden_state_forward(policy)
        if self.ref_model is not None:
            reference = self.accelerator.unwrap_model(self.ref_model)
            self._logit_transform = check_same_transform(
                policy.config.get_text_config(), reference.config.get_text_config()
            )
            _hidden_state_forward(reference)
        self.adaptive_beta = AdaptiveBeta(args.beta, args.epsilon)
        # (loss type, weight) in TRL's order, as TRL sums them (a list: a type may repeat).
        self.weighted_loss_types = list(zip(args.loss_type, self.loss_weights, strict=True))
        # Per mode: (names, summed values, a row of logit sums and counts per micro-batch).
        self._metric_sums = {"train": None, "eval": None}
        self._train_tokens = 0  # attention-mask tokens of the training batches, all processes
        self.add_callback(_BetaUpdate(self))

    def _check_parallelism(self) -> None:
        """The accelerator's parallelism, which args may not show: transformers gives it the
        tensor-parallel size of a model sharded as it loaded (``tp_plan="auto"``)."""
        problem = parallelism_problem(getattr(self.accelerator, "parallelism_config", None))
        if problem:
            raise ValueError(f"{problem} (the model or the accelerator set it)")

    def _use_packed_batches(self, data_collator) -> None:
        """padding_free=True: batches reach the model as one packed row with ``position_ids``
        (``DataCollatorForPackedPreference`` unless the caller passed a collator of its own)."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
            raise ValueError(
                "padding_free=True: prompt-learning PEFT adapters prepend virtual tokens to each "
                "row, which would join the packed sequences; use padding_free=False"
            )
        if data_collator is None:
            self.data_collator = DataCollatorForPackedPreference(
                max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode,
                pad_to_multiple_of=self.args.pad_to_multiple_of,
                pad_token_id=self._tokenizer.pad_token_id,
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Text rows go through TRL's preparation (prompt extraction, EOS, tokenization, the
        drop of rows whose prompt fills ``max_length``). Rows that are already token ids
        (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the caller tokenized, truncated and
        filtered them) are used as they are; TRL 1.16 would try to re-tokenize them."""
        columns = dataset.column_names or list(next(iter(dataset)))
        if set(TOKENIZED_COLUMNS) <= set(columns):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _unwrapped_policy(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    # -- the loss ------------------------------------------------------------------------------

    @staticmethod
    def _model_inputs(inputs) -> dict:
        names = ("input_ids", "attention_mask", "position_ids")
        return {k: inputs[k] for k in names if k in inputs}

    @staticmethod
    def _scoring(hidden, inputs):
        """The hidden states that score ``labels[:, 1:]``: prompt-learning PEFT prepends virtual
        tokens, and ``hidden[:, t]`` scores token ``t + 1``."""
        return hidden[:, -inputs["input_ids"].shape[1] :][:, :-1]

    def _reference(self, inputs):
        """The reference's pass without gradient: its hidden states (scoring ``labels[:, 1:]``)
        and a context that holds its lm_head's ``(weight, bias)`` whole, for the loss's forward
        (under ZeRO-3 and FSDP the head stands in shards after the forward). ``ref_model``'s,
        else the PEFT policy's with its adapter disabled, whose head parameters are the ones
        that pass reads (a ``modules_to_save`` head has a trained copy beside them). The forward
        runs under the Trainer's autocast, as accelerate runs a prepared model's (the
        reference's forward was wrapped before ``_hidden_state_forward`` replaced it: TRL
        prepares it in ``__init__``, the policy only in ``train()``)."""
        model, adapter = self.ref_model, contextlib.ExitStack()
        if model is None:
            model = self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            if not is_peft_model(unwrapped):
                raise ValueError("no reference: pass ref_model or train a PEFT adapter")
            from trl.trainer.utils import use_adapter

            name = "ref" if "ref" in unwrapped.peft_config else None
            adapter.enter_context(use_adapter(unwrapped, adapter_name=name))
            # The reference pass runs through the policy: checkpointing a forward without
            # gradients only costs (and warns under reentrant checkpointing); switch it off.
            adapter.enter_context(
                _no_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs)
            )
        kept = []

        def keep(hidden, head):
            if self.ref_model is not None:
                params = functools.partial(whole_head, self.ref_model, head)
            else:
                params = functools.partial(whole_parameters, head.weight, _bias(head))
            kept.append((self._scoring(hidden, inputs), params))
            return ()

        with torch.no_grad(), adapter, self.accelerator.autocast():
            model(**self._model_inputs(inputs), epsdpo_head=keep)
        return kept.pop()

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        scored = inputs["completion_mask"] != 0
        packing = {}
        if "sequence_ids" in inputs:
            # hidden[:, t] scores token t + 1, which must be of the same sequence: a sequence's
            # first token (position 0) is never scored, as column 0 of a padded row is not.
            scored = scored & (inputs["position_ids"] != 0)
            packing = dict(
                sequence_ids=inputs["sequence_ids"][:, 1:], num_pairs=inputs["num_pairs"]
            )
        labels = inputs["input_ids"].masked_fill(~scored, -100)[:, 1:]
        weighting = {}
        if self.args.ld_alpha is not None:
            weighting["token_weights"] = ld_token_weights(
                labels, packing.get("sequence_ids"), packing.get("num_pairs"), self.args.ld_alpha
            )
        precomputed = self.args.precompute_ref_log_probs
        # ε = 0 when precomputed (checked with the config): the reference enters through its
        # precomputed sums alone. The policy stands in for it in the fused call, which then
        # costs one more lm_head pass without gradient, not a reference model's forward.
        reference = None if precomputed else self._reference(inputs)
        beta = self.adaptive_beta.beta
        results = []

        def head_loss(hidden, head):
            """The loss, run as the policy's lm_head forward inside the policy's forward; its
            differentiable outputs go back through the engines' hooks, the rest aside."""
            policy_hidden = self._scoring(hidden, inputs)
            ref_hidden, ref_params = reference or (
                policy_hidden.detach(),
                functools.partial(whole_parameters, head.weight, _bias(head)),
            )
            device = policy_hidden.device
            # Under mixed precision (bf16=True/fp16=True) the loss casts its inputs to the
            # autocast dtype once, as autocast casts an lm_head's: a half lm_head is used as it
            # is (no copy), and the matmuls run in the autocast dtype whatever the models'
            # storage dtypes.
            with ref_params() as (ref_weight, ref_bias), self.accelerator.autocast():
                out = linear_epsilon_dpo_loss(
                    policy_hidden,
                    head.weight,
                    ref_hidden.to(device),
                    ref_weight.to(device),
                    labels.to(device),
                    beta=beta,
                    epsilon=self.args.epsilon,
                    label_smoothing=self.args.label_smoothing,
                    policy_bias=_bias(head),
                    ref_bias=ref_bias,
                    wpo_weights=self.args.use_weighting,
                    **self._logit_transform,
                    **{
                        k: v.to(device) if torch.is_tensor(v) else v
                        for k, v in {**packing, **weighting}.items()
                    },
                )
            results.append(out)
            return tuple(getattr(out, name) for name in _DIFFERENTIABLE)

        def policy_loss(hidden, head):
            return run_as_forward(head, lambda hidden: head_loss(hidden, head), hidden)

        # MoE: the router logits of the policy's forward only, as TRL (the reference is frozen).
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            *differentiable, aux_loss = model(
                **self._model_inputs(inputs), epsdpo_head=policy_loss, **router
            )
        out = dataclasses.replace(results.pop(), **dict(zip(_DIFFERENTIABLE, differentiable)))
        if precomputed:
            out = with_reference_logps(
                out,
                inputs["ref_chosen_logps"],
                inputs["ref_rejected_logps"],
                label_smoothing=self.args.label_smoothing,
            )
        loss = self._weighted_loss(out, inputs, labels, packing)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        if mode == "train":
            self.adaptive_beta.observe(out.steps, out.finite_pairs)
        # TRL's num_tokens counts the batch's real tokens (its attention mask; packed: no filler).
        tokens = (inputs["sequence_ids"] >= 0).sum() if packing else inputs["attention_mask"].sum()
        self._accumulate(mode, out, tokens, aux_loss)
        if return_outputs:
            return loss, out
        return loss

    def _weighted_loss(self, out, inputs, labels, packing):
        """Σ weight × batch mean of each ``loss_type``, as TRL sums them: the pair losses of
        ``preference_losses`` (β̃ per pair), and "sft", the mean NLL over the batch's chosen
        completion tokens. With ``use_weighting`` every term's per-pair values are WPO-weighted
        first (the sft term, one number per batch, by the mean weight), as TRL weights them."""
        args = self.args
        loss = 0.0
        # (B,) WPO's weights, detached, or 1.
        pair_weights = out.wpo_weights if args.use_weighting else 1.0
        for loss_type, weight in self.weighted_loss_types:
            if loss_type == "sft":
                if packing:
                    chosen = (labels != -100) & (packing["sequence_ids"] < packing["num_pairs"])
                else:
                    chosen = labels[: labels.shape[0] // 2] != -100
                term = -out.chosen_logps.sum() / chosen.sum().clamp(min=1)
                if args.use_weighting:
                    term = term * pair_weights.mean()
            else:
                lengths = {}
                if loss_type in LENGTH_NORMALISED:
                    lengths = dict(
                        zip(("chosen_lengths", "rejected_lengths"), self._lengths(inputs))
                    )
                term = preference_losses(
                    out,
                    loss_type,
                    label_smoothing=args.label_smoothing,
                    f_divergence_type=args.f_divergence_type,
                    f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                    discopop_tau=args.discopop_tau,
                    **lengths,
                )
                term = (term * pair_weights).mean()
            loss = loss + weight * term
        return loss

    @staticmethod
    def _lengths(inputs):
        """Each response's completion tokens (chosen, rejected), counted on the completion mask
        as TRL's length-normalised losses count them: all of a sequence's completion tokens,
        also one at its first position, which is never scored."""
        mask = inputs["completion_mask"]
        if "sequence_ids" not in inputs:
            return mask.sum(dim=1).float().chunk(2)
        ids = inputs["sequence_ids"].flatten()
        real = ids >= 0
        counts = torch.zeros(2 * inputs["num_pairs"], device=mask.device)
        counts.index_add_(0, ids[real], mask.flatten()[real].float())
        return counts.chunk(2)

    # -- metrics: per-pair sums kept on the device, reduced over processes when logged ---------

    def _accumulate(self, mode, out, tokens, aux_loss=None):
        """Add one micro-batch to ``mode``'s sums, float64 tensors on the device: per-pair
        metrics summed over pairs, the per-batch values once (the MoE ``aux_loss`` too, as TRL
        logs it), the pair and batch counts, and the batch's tokens (attention mask), for TRL's
        running ``num_tokens``; and, a row per micro-batch, the sums of the mean logit (over V)
        of the chosen and the rejected scored tokens with their counts: TRL's ``logits/*`` is
        each micro-batch's sum over every process divided by its count over every process,
        averaged over micro-batches, which no running sum gives."""
        device = out.losses.device

        def fill(value):
            # On the device: torch.tensor of a host number would be a blocking host-to-device
            # copy on CUDA, every micro-batch.
            return torch.full((), value, dtype=torch.float64, device=device)

        values = {k: v.detach().double().sum() for k, v in out.pair_metrics().items()}
        values["kl/beta"] = fill(out.beta)
        if aux_loss is not None:
            values["aux_loss"] = aux_loss.detach().double().to(device)
        values["_pairs"] = fill(out.losses.numel())
        values["_batches"] = fill(1.0)
        values["_tokens"] = tokens.detach().double().reshape(()).to(device)
        row = torch.stack(list(values.values()))
        counts = [out.chosen_tokens.detach().sum(), out.rejected_tokens.detach().sum()]
        means = [out.mean_chosen_logits.detach(), out.mean_rejected_logits.detach()]
        logits = torch.stack([means[0] * counts[0], counts[0], means[1] * counts[1], counts[1]])
        previous = self._metric_sums[mode]
        if previous is None:
            self._metric_sums[mode] = (list(values), row, [logits.double()])
        else:
            previous[2].append(logits.double())
            self._metric_sums[mode] = (list(values), previous[1] + row, previous[2])

    def _reduced_metrics(self, mode) -> dict[str, float]:
        if self._metric_sums[mode] is None:
            return {}
        names, sums, logit_rows = self._metric_sums[mode]
        self._metric_sums[mode] = None
        # One collective: every process has as many micro-batches (as TRL's per-batch gathers
        # require too), so the rows line up.
        reduced = self.accelerator.reduce(torch.cat([sums, *logit_rows]), "sum").tolist()
        totals = dict(zip(names, reduced[: len(names)]))
        pairs, batches, tokens = totals.pop("_pairs"), totals.pop("_batches"), totals.pop("_tokens")
        metrics = {k: v / (batches if k in _PER_BATCH else pairs) for k, v in totals.items()}
        metrics.pop("loss", None)  # Trainer logs the optimised loss itself
        rows = [reduced[i : i + 4] for i in range(len(names), len(reduced), 4)]
        for name, column in (("logits/chosen", 0), ("logits/rejected", 2)):
            ratios = [r[column] / r[column + 1] if r[column + 1] > 0 else 0.0 for r in rows]
            metrics[name] = sum(ratios) / len(ratios)
        # As TRL: the training tokens seen so far, all processes (logged with eval metrics too).
        if mode == "train":
            self._train_tokens += int(tokens)
        metrics["num_tokens"] = self._train_tokens
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._reduced_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        # In place, as DPOTrainer does: evaluate() returns the very dict it logs.
        logs.update(metrics)
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss; with ``compute_metrics`` (``prediction_loss_only`` False), also
        the policy's logits and ``input_ids`` as labels, as TRL passes them. Those logits come
        from one more forward of the policy, which forms them: the fused loss never does, and
        TRL 1.16 recomputes them the same way (it deprecates ``compute_metrics`` for this cost)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
            if prediction_loss_only:
                return loss.detach(), None, None
            with self.accelerator.autocast():
                logits = model(**self._model_inputs(inputs), use_cache=False).logits
        return loss.detach(), logits, inputs["input_ids"]

    # -- β across optimizer steps and checkpoints ----------------------------------------------

    def _update_beta(self) -> None:
        self.beta = self.adaptive_beta.update()

    def _beta_state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, BETA_STATE_FILE)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Every process saves (the engines' shards), so every process takes part in the sum of
        # the training tokens not yet logged; a resumed run's num_tokens goes on from the total.
        tokens = self._train_tokens + self._unlogged_train_tokens()
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = self._beta_state_path(os.path.join(self._get_output_dir(trial=trial), folder))
            with open(path, "w") as f:
                json.dump({**self.adaptive_beta.state_dict(), "num_tokens": tokens}, f)

    def _unlogged_train_tokens(self) -> int:
        """The training tokens of every process since the last log (a collective)."""
        sums = self._metric_sums["train"]
        local = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        if sums is not None:
            local = sums[1][sums[0].index("_tokens")]
        return int(self.accelerator.reduce(local, "sum"))

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no checkpoint found in {self.args.output_dir}"
                )
        if checkpoint:
            path = self._beta_state_path(checkpoint)
            if not os.path.isfile(path):
                raise ValueError(
                    f"resume_from_checkpoint={checkpoint}: no {BETA_STATE_FILE} there, so the "
                    "run's β cannot be restored (was the checkpoint written by EpsilonDPOTrainer?)"
                )
            with open(path) as f:
                state = json.load(f)
            try:
                self.adaptive_beta.load_state_dict(state)
            except ValueError as e:
                raise ValueError(f"resume_from_checkpoint={checkpoint}: {e}") from None
            self.beta = self.adaptive_beta.beta
            # Checkpoints written before num_tokens was saved count from 0 again, as TRL does.
            self._train_tokens = int(state.get("num_tokens", 0))
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)


@contextlib.contextmanager
def _no_checkpointing(model, checkpointing_kwargs):
    """Activation checkpointing off for the block, under transformers' current names
    (``activation_checkpointing_*`` from 5.x, ``gradient_checkpointing_*`` before)."""
    new_names = hasattr(model, "activation_checkpointing_enable")
    prefix = "activation_checkpointing" if new_names else "gradient_checkpointing"
    enabled = getattr(model, f"is_{prefix}", False)
    if enabled:
        getattr(model, f"{prefix}_disable")()
    try:
        yield
    finally:
        if enabled:
            getattr(model, f"{prefix}_enable")(checkpointing_kwargs)


class _BetaUpdate(TrainerCallback):
    """β moves once per optimizer step, after all of the step's micro-batches were observed;
    on every process, since ``AdaptiveBeta.update`` all-reduces."""

    def __init__(self, trainer: EpsilonDPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_beta()


__all__ = [
    "EpsilonDPOConfig",
    "EpsilonDPOTrainer",
    "DataCollatorForPackedPreference",
    "refused_options",
    "BETA_STATE_FILE",
    "TOKENIZED_COLUMNS",
]
