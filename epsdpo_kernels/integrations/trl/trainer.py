"""``EpsilonDPOTrainer``: TRL's ``DPOTrainer`` with the loss replaced by the fused
``linear_epsilon_dpo_loss`` on the last hidden states and lm_head weights, and β carried across
optimizer steps and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import DPOTrainer

from ... import sequences as S
from ...adaptive_beta import AdaptiveBeta
from ...engines import run_as_forward, whole_head, whole_parameters
from ...hugging_face import check_same_transform, logit_transform
from ...linear_loss import linear_epsilon_dpo_loss
from ...loss_types import LENGTH_NORMALISED, preference_losses, with_reference_logps
from .collator import TOKENIZED_COLUMNS, DataCollatorForPackedPreference
from .config import EpsilonDPOConfig, check_options, parallelism_problem
from .model_hook import head_bias, hidden_state_forward, no_checkpointing, router_aux_loss

BETA_STATE_FILE = "epsilon_dpo_beta.json"
# The output's fields with a gradient: the ones the loss returns through the engines' hooks.
_DIFFERENTIABLE = ("loss", "losses", "chosen_logps", "rejected_logps")
# Logged metrics that are one value per micro-batch (averaged over batches, not pairs).
_PER_BATCH = ("kl/beta", "aux_loss")


def ld_token_weights(labels, sequence_ids, num_pairs, alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights (TRL's ``ld_alpha``), in the labels' layout: 1 on each
    response's first ``min(len_chosen, len_rejected)`` scored tokens, ``alpha`` on the rest, so
    that the longer response's tail is down-weighted. Padded rows (sequence n = row n) or a
    packed row with ``sequence_ids`` and ``num_pairs`` (a sequence's tokens in stream order,
    anywhere in the row). Device ops only: no host synchronisation."""
    scored = labels != -100
    count = labels.shape[0] if sequence_ids is None else 2 * num_pairs
    if sequence_ids is None:
        rows = torch.arange(count, device=labels.device)
        sequence_ids = rows.unsqueeze(1).expand_as(labels)
    keys, _ = S.sequence_keys(sequence_ids, scored, count)
    lengths = S.run_lengths(keys, count)
    shared = torch.minimum(lengths[: count // 2], lengths[count // 2 :]).repeat(2)
    shared = torch.cat([shared, shared.new_zeros(1)])[keys]
    weights = torch.where(S.places(keys, lengths) <= shared, 1.0, float(alpha))
    return torch.where(scored.reshape(-1), weights, 0.0).reshape(labels.shape)


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
        hidden_state_forward(policy)
        if self.ref_model is not None:
            reference = self.accelerator.unwrap_model(self.ref_model)
            self._logit_transform = check_same_transform(
                policy.config.get_text_config(), reference.config.get_text_config()
            )
            hidden_state_forward(reference)
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
        reference's forward was wrapped before ``hidden_state_forward`` replaced it: TRL
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
                no_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs)
            )
        kept = []

        def keep(hidden, head):
            if self.ref_model is not None:
                params = functools.partial(whole_head, self.ref_model, head)
            else:
                params = functools.partial(whole_parameters, head.weight, head_bias(head))
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
                functools.partial(whole_parameters, head.weight, head_bias(head)),
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
                    policy_bias=head_bias(head),
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

        values = out.pair_metric_sums()
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


class _BetaUpdate(TrainerCallback):
    """β moves once per optimizer step, after all of the step's micro-batches were observed;
    on every process, since ``AdaptiveBeta.update`` all-reduces."""

    def __init__(self, trainer: EpsilonDPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_beta()
