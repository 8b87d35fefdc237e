"""Padding-free preference batches for the trainer: TRL's tokenized pairs, every sequence whole in
one row, with the ``sequence_ids`` and ``num_pairs`` the loss takes for a packed stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A dataset with these columns is already tokenized pairs and is used as it is.
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


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
