"""Preference data for train/run.py: loading, TRL's row formats, tokenisation, batching.

Rows follow TRL's preference formats: explicit prompt (``prompt``, ``chosen``, ``rejected``) or
implicit prompt (``chosen``, ``rejected`` sharing a prefix), each as strings or as
conversational message lists (``[{"role": ..., "content": ...}, ...]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

EVAL_SPLITS = ("eval", "test", "validation")


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


# ----------------------------------------------------------------------------- loading
def load_rows(source: str, *, seed: int = 0, eval_fraction: float = 0.05):
    """(train_rows, eval_rows) from a directory with train/eval JSONL files, one JSON/JSONL file
    (eval held out at random), or a Hugging Face dataset id (needs the ``datasets`` extra)."""
    path = Path(source)
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in (".json", ".jsonl")}
        if "train" not in files:
            raise ValueError(f"--dataset {source}: a directory needs train.jsonl or train.json")
        eval_name = next((s for s in EVAL_SPLITS if s in files), None)
        train = _read_file(files["train"])
        if eval_name is None:
            return _hold_out(train, seed, eval_fraction)
        return train, _read_file(files[eval_name])
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.exists():
            raise ValueError(f"--dataset {source}: no such file")
        return _hold_out(_read_file(path), seed, eval_fraction)
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"--dataset {source} is not a local file or directory; loading a Hugging Face dataset "
            "needs the 'datasets' package: pip install -e '.[datasets]'"
        ) from e
    ds = datasets.load_dataset(source)
    train = [dict(r) for r in ds["train"]]
    eval_name = next((s for s in EVAL_SPLITS if s in ds), None)
    if eval_name is None:
        return _hold_out(train, seed, eval_fraction)
    return train, [dict(r) for r in ds[eval_name]]


def _read_file(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from e
        return rows
    data = json.loads(text)
    if isinstance(data, dict) and "train" in data:
        data = data["train"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows (or {{'train': [...]}})")
    return data


def _hold_out(rows, seed, fraction):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    n_eval = max(1, int(len(rows) * fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------- formats
def _is_messages(x) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x
    )


def _field(row, name: str, where: str):
    if name not in row:
        raise ValueError(f"{where}: missing field '{name}' (fields: {sorted(row)})")
    value = row[name]
    if isinstance(value, str) or (_is_messages(value) and value):
        return value
    raise ValueError(
        f"{where}: field '{name}' must be a string or a non-empty list of "
        f"{{'role': str, 'content': str}} messages, got {type(value).__name__}"
    )


def split_row(row, where: str):
    """(prompt, chosen, rejected), all strings or all message lists, explicit prompt made."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    if "prompt" in row:
        prompt = _field(row, "prompt", where)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == len(chosen) or n == len(rejected):
            raise ValueError(f"{where}: implicit prompt, but 'chosen' and 'rejected' do not differ")
        n = chosen.rfind(" ", 0, n + 1) if " " in chosen[:n] else n  # cut at a word boundary
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise ValueError(f"{where}: implicit conversational prompt, but no shared messages")
    else:
        raise ValueError(f"{where}: 'chosen' and 'rejected' must both be strings or both messages")
    kinds = {isinstance(x, str) for x in (prompt, chosen, rejected)}
    if len(kinds) != 1:
        raise ValueError(f"{where}: 'prompt', 'chosen', 'rejected' mix strings and message lists")
    return prompt, chosen, rejected


def _render(tokenizer, prompt, completion):
    """(prompt_text, completion_text) with the chat template applied to message lists."""
    if isinstance(prompt, str):
        return prompt, completion
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                    add_generation_prompt=True)  # fmt: skip
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            # Some templates render the assistant turn differently from the generation prompt.
            prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False)
        return prompt_text, full[len(prompt_text) :]
    render = lambda ms: "".join(f"{m['role']}: {m['content']}\n" for m in ms)  # noqa: E731
    return render(prompt) + "assistant: ", render(completion)[len("assistant: ") :]


def tokenize_rows(rows, tokenizer, *, max_length: int, max_prompt_length: int, source: str):
    """Rows → Pairs. The prompt is truncated from the left to ``max_prompt_length``, the
    completions from the right to fit ``max_length``; completions end with EOS."""
    if max_prompt_length >= max_length:
        raise ValueError("--max-prompt-length must be smaller than --max-length")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; completions need one")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        prompt, chosen, rejected = split_row(row, where)
        prompt_text, chosen_text = _render(tokenizer, prompt, chosen)
        _, rejected_text = _render(tokenizer, prompt, rejected)
        prompt_ids = encode(prompt_text)
        if bos is not None and prompt_ids[:1] != [bos]:
            prompt_ids = [bos] + prompt_ids
        prompt_ids = prompt_ids[-max_prompt_length:]
        room = max_length - len(prompt_ids)
        pairs.append(Pair(prompt_ids, (encode(chosen_text) + [eos])[:room],
                          (encode(rejected_text) + [eos])[:room]))  # fmt: skip
    return pairs


# ----------------------------------------------------------------------------- batching
def collate(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """2P rows (chosen first, then rejected), right-padded. ``labels[:, t]`` is the token at
    t + 1 where it is part of a completion, else -100: already shifted for the loss."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [
        p.prompt_ids + p.rejected_ids for p in pairs
    ]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for n, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[n, : len(seq)] = torch.tensor(seq)
        attention_mask[n, : len(seq)] = 1
        labels[n, p - 1 : len(seq) - 1] = torch.tensor(seq[p:])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
