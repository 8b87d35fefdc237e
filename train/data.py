"""Preference data for the scripts in train/: loading, TRL's row formats, tokenisation, batching.

Rows follow TRL's preference formats: explicit prompt (``prompt``, ``chosen``, ``rejected``) or
implicit prompt (``chosen``, ``rejected`` sharing a prefix, split as TRL's ``extract_prompt``
splits it), each as strings or as conversational message lists
(``[{"role": ..., "content": ...}, ...]``). Files may be ``.json``/``.jsonl``, gzipped or not
(Anthropic's HH-RLHF ships ``.jsonl.gz``).

Every row keeps where it came from (file and line), so that a message about it names the line a
user can open, whatever shuffling happened since. A malformed row (a missing field, a value of
the wrong type) stops the run; a well-formed row that cannot form a pair (chosen and rejected
identical) is skipped, counted and reported once.
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.cli import UsageError, looks_like_path

EVAL_SPLITS = ("eval", "test", "validation")
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
DEFAULT_DATASET = Path(__file__).resolve().parent / "pairs" / "default"
DATASET_HELP = (
    "preference data: a .json/.jsonl file (optionally .gz), a directory with train and "
    "eval|test|validation files, or a Hugging Face dataset id; default: the embedded "
    "train/pairs/default"
)
# A prompt or completion that loses more than this share of its tokens to truncation counts as
# "mostly dropped" in the truncation report.
MOSTLY_DROPPED = 0.5


class DataError(UsageError):
    """A dataset that cannot be read as preference data; the message names file, line, field."""


@dataclass(frozen=True)
class Row:
    data: object  # one parsed JSON value
    where: str  # "train.jsonl.gz line 12", "prefs.json item 3", "org/name train[5]"
    file: str = ""  # the file (or "org/name train" for a hub split) it came from
    line: int = 0  # its 1-based line (JSONL), item (JSON list) or index + 1 (hub split)


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str = ""


# ----------------------------------------------------------------------------- loading
def data_suffix(path: Path) -> str | None:
    """The data-file suffix ``path`` ends with (the longest that matches), or None."""
    name = path.name
    return next((s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def check_dataset_arg(source: str | None) -> None:
    """Fail before anything loads when --dataset names a local path that does not exist."""
    if (
        source is not None
        and not Path(source).expanduser().exists()
        and looks_like_path(source, DATA_SUFFIXES)
    ):
        raise DataError(f"--dataset {source}: no such file or directory")


def load_rows(source: str, *, seed: int = 0, eval_fraction: float = 0.05):
    """(train_rows, eval_rows) from a directory with train and eval/test/validation files, one
    JSON/JSONL file (``eval_fraction`` held out at random), or a Hugging Face dataset id (needs
    the ``datasets`` extra)."""
    splits = read_splits(source)
    train = splits["train"][1]
    eval_name = next((s for s in EVAL_SPLITS if s in splits), None)
    if eval_name is None:
        return _hold_out(train, seed, eval_fraction)
    return train, splits[eval_name][1]


def read_splits(source: str) -> dict[str, tuple[Path | None, list[Row]]]:
    """Every row of ``source`` as stored, by split: ``{"train": (file, rows), "eval": ...}``
    (a single file is one "train" split; ``file`` is None for a Hugging Face dataset)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = {}
        for p in sorted(path.iterdir()):
            suffix = data_suffix(p)
            if suffix is None:
                continue
            name = p.name[: -len(suffix)]
            if name in files:  # train.json and train.jsonl: which one is meant is not ours to guess
                raise DataError(
                    f"--dataset {source}: holds both {files[name].name} and {p.name} for the "
                    f"{name} split; keep one of them"
                )
            files[name] = p
        if "train" not in files:
            raise DataError(
                f"--dataset {source}: a directory needs a train file "
                f"(train{{{','.join(DATA_SUFFIXES)}}})"
            )
        names = ["train"] + [s for s in EVAL_SPLITS if s in files][:1]
        return {name: (files[name], _read_file(files[name])) for name in names}
    if path.is_file():
        if data_suffix(path) is None:
            raise DataError(
                f"--dataset {source}: expected a file ending in {', '.join(DATA_SUFFIXES)}"
            )
        return {"train": (path, _read_file(path))}
    if looks_like_path(source, DATA_SUFFIXES):
        raise DataError(f"--dataset {source}: no such file or directory")
    return _load_hub(source)


def _load_hub(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--dataset {source}: no such file or directory here; to load it as a Hugging Face "
            "dataset id, install the datasets extra: pip install -e '.[datasets]'"
        ) from None
    try:
        ds = datasets.load_dataset(source)
    except Exception as e:  # offline, unknown id, no access: all the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"--dataset {source}: could not load it as a Hugging Face dataset ({first})"
        ) from None
    if "train" not in ds:
        raise DataError(f"--dataset {source}: the dataset has no 'train' split ({list(ds)})")

    def rows(split):
        return [
            Row(dict(r), f"{source} {split}[{i}]", f"{source} {split}", i + 1)
            for i, r in enumerate(ds[split])
        ]

    names = ["train"] + [s for s in EVAL_SPLITS if s in ds][:1]
    return {name: (None, rows(name)) for name in names}


# The first line of a file Git LFS stores: a clone without `git lfs` has this pointer instead.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _read_file(path: Path) -> list[Row]:
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise DataError(
            f"{path}: a Git LFS pointer, not the data itself (the repository it came from stores "
            "the file with Git LFS); fetch the real file with `git lfs pull` in that clone, or "
            "download it from the dataset's page"
        )
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    # A UTF-8 byte order mark (editors on Windows write one) is not part of the data.
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: cannot read it as UTF-8 text (byte 0x{raw[e.start]:02x} is "
            f"not UTF-8; {e.reason}); save the file as UTF-8"
        ) from None
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(Row(json.loads(line), f"{path} line {i + 1}", str(path), i + 1))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {i + 1}: not valid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and "train" in data:
            data = data["train"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{'train': [...]}})")
        rows = [Row(r, f"{path} item {i + 1}", str(path), i + 1) for i, r in enumerate(data)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _hold_out(rows: list[Row], seed: int, fraction: float):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    n_eval = max(1, int(len(rows) * fraction)) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# ----------------------------------------------------------------------------- formats
class Unpairable(Exception):
    """A well-formed row that cannot form a preference pair; the message is the reason."""


def extract_prompt(chosen, rejected):
    """Split an implicit prompt the way TRL's ``extract_prompt`` (trl/data_utils.py) does.

    The prompt is everything before the first position where ``chosen`` and ``rejected``
    differ (characters of strings, or messages of conversations), moved back by one when the
    character before it is a space, so that the completion keeps its leading space. When one
    response is a prefix of the other, TRL's loop ends without finding a difference and keeps
    the last shared element in the completions; so does this. One deliberate difference: where
    the responses differ at their very first character, TRL compares ``chosen[-1]`` (the last
    character) with a space; this keeps the prompt empty instead.
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x
    )


def _field(row: Row, name: str):
    data = row.data
    if name not in data:
        raise DataError(f"{row.where}: missing field '{name}' (fields: {sorted(data)})")
    value = data[name]
    if isinstance(value, str) or (_is_messages(value) and value):
        return value
    raise DataError(
        f"{row.where}: field '{name}' must be a string or a non-empty list of "
        f"{{'role': str, 'content': str}} messages, got {type(value).__name__}"
    )


def split_row(row: Row):
    """(prompt, chosen, rejected), all strings or all message lists, the prompt made explicit.

    Raises ``DataError`` for a malformed row and ``Unpairable`` for one that cannot form a pair.
    """
    if not isinstance(row.data, dict):
        raise DataError(f"{row.where}: expected a JSON object, got {type(row.data).__name__}")
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{row.where}: 'chosen' and 'rejected' must both be strings or both message lists"
        )
    if chosen == rejected:
        raise Unpairable("chosen and rejected are identical")
    if "prompt" in row.data:
        prompt = _field(row, "prompt")
    else:
        if not chosen or not rejected:
            raise Unpairable("one response is empty")
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if isinstance(prompt, list) and not prompt:
            raise Unpairable("the two conversations share no prompt messages")
    if len({isinstance(x, str) for x in (prompt, chosen, rejected)}) != 1:
        raise DataError(
            f"{row.where}: 'prompt', 'chosen', 'rejected' mix strings and message lists"
        )
    return prompt, chosen, rejected


def _render(tokenizer, prompt, completion):
    """(prompt_text, completion_text) with the chat template applied to message lists."""
    if isinstance(prompt, str):
        return prompt, completion
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            # Some templates render the assistant turn differently from the generation prompt.
            prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False)
        return prompt_text, full[len(prompt_text) :]
    render = lambda ms: "".join(f"{m['role']}: {m['content']}\n" for m in ms)  # noqa: E731
    return render(prompt) + "assistant: ", render(completion)[len("assistant: ") :]


@dataclass
class Tokenized:
    """The pairs of one split, and what was skipped or cut on the way."""

    pairs: list[Pair]
    rows: int
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    prompt_mostly_cut: int = 0
    completion_mostly_cut: int = 0

    def notes(self, name: str, max_length: int, max_prompt_length: int) -> list[str]:
        """One line per thing a user should know: skipped rows (with the first locations) and
        truncation that dropped most of a prompt or completion (with the share affected)."""
        lines = []
        for reason, where in self.skipped.items():
            shown = ", ".join(where[:3]) + (", …" if len(where) > 3 else "")
            lines.append(
                f"{name}: skipped {len(where)} of {self.rows} rows that cannot form a "
                f"pair ({reason}): {shown}"
            )
        for count, what, flag in (
            (self.prompt_mostly_cut, "prompt", f"--max-prompt-length {max_prompt_length}"),
            (
                self.completion_mostly_cut,
                "chosen or rejected completion",
                f"--max-length {max_length}",
            ),
        ):
            if count:
                total = len(self.pairs)
                lines.append(
                    f"{name}: {flag} cut more than half of the {what} of {count} of "
                    f"{total} pairs ({count / max(1, total):.0%}); raise it to keep "
                    "them"
                )
        return lines


def _check_encodable(row: Row, *texts: str) -> None:
    """JSON can spell a lone surrogate ("\\ud800", half of an emoji's UTF-16 pair), which no
    tokenizer can encode: name the row instead of failing inside the tokenizer."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"{row.where}: its text holds {text[e.start]!r}, a lone UTF-16 surrogate and not "
                "a character (often an emoji cut in half by whatever wrote the file); fix or "
                "drop that row"
            ) from None


def tokenize_rows(rows: list[Row], tokenizer, *, max_length: int, max_prompt_length: int):
    """Rows → ``Tokenized``. The prompt is truncated from the left to ``max_prompt_length``, the
    completions from the right to fit ``max_length``; completions end with EOS."""
    if max_prompt_length >= max_length:
        raise UsageError("--max-prompt-length must be smaller than --max-length")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no eos_token; completions need one")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    out = Tokenized(pairs=[], rows=len(rows))
    for row in rows:
        try:
            prompt, chosen, rejected = split_row(row)
        except Unpairable as e:
            out.skipped[str(e)].append(row.where)
            continue
        prompt_text, chosen_text = _render(tokenizer, prompt, chosen)
        _, rejected_text = _render(tokenizer, prompt, rejected)
        _check_encodable(row, prompt_text, chosen_text, rejected_text)
        full_prompt = encode(prompt_text)
        if bos is not None and full_prompt[:1] != [bos]:
            full_prompt = [bos] + full_prompt
        if not full_prompt:
            out.skipped["empty prompt, and the tokenizer has no BOS token to start it"].append(
                row.where
            )
            continue
        prompt_ids = full_prompt[-max_prompt_length:]
        room = max_length - len(prompt_ids)
        full_chosen, full_rejected = encode(chosen_text) + [eos], encode(rejected_text) + [eos]
        chosen_ids, rejected_ids = full_chosen[:room], full_rejected[:room]
        if chosen_ids == rejected_ids:
            out.skipped[f"identical after truncation to --max-length {max_length}"].append(
                row.where
            )
            continue
        out.prompt_mostly_cut += len(prompt_ids) < (1 - MOSTLY_DROPPED) * len(full_prompt)
        out.completion_mostly_cut += any(
            len(kept) < (1 - MOSTLY_DROPPED) * len(full)
            for kept, full in ((chosen_ids, full_chosen), (rejected_ids, full_rejected))
        )
        out.pairs.append(Pair(prompt_ids, chosen_ids, rejected_ids, row.where))
    return out


def read_pairs(
    source: str | None, tokenizer, *, seed: int, max_length: int, max_prompt_length: int, log=print
) -> tuple[list[Pair], list[Pair]]:
    """(train pairs, eval pairs) of ``--dataset`` (the embedded default when None), with one
    ``note:`` line per thing skipped or cut and the counts: what every script that trains or
    scores prints, so that they agree on which pairs they use."""
    train_rows, eval_rows = load_rows(source or str(DEFAULT_DATASET), seed=seed)
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    train_data = tokenize_rows(train_rows, tokenizer, **lengths)
    eval_data = tokenize_rows(eval_rows, tokenizer, **lengths)
    for name, data in (("train", train_data), ("eval", eval_data)):
        for note in data.notes(name, **lengths):
            log(f"note: {note}")
    if not train_data.pairs:
        raise UsageError(f"--dataset {source}: no training pairs left (see the notes above)")
    log(f"{len(train_data.pairs)} train pairs, {len(eval_data.pairs)} eval pairs")
    return train_data.pairs, eval_data.pairs


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


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row holding at most ``row_length``
    tokens (every length is at most ``row_length``, as tokenisation truncates to it). Longest
    first wastes less of each row than arrival order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_length - n)
    return rows


def collate_packed(pairs: list[Pair], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """The same 2P sequences as ``collate``, packed whole into rows of at most ``row_length``
    tokens (first-fit), with ``position_ids`` restarting at 0 for each sequence (the model keeps
    attention inside each) and ``sequence_ids`` (sequence n as in ``collate``: chosen of pair n
    for n < P, else rejected of pair n − P). Rows are right-padded to the longest; a row's
    padding is a sequence of its own (positions from 0) whose labels are -100."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [
        p.prompt_ids + p.rejected_ids for p in pairs
    ]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    rows = pack_rows([len(s) for s in seqs], row_length)
    length = max(sum(len(seqs[i]) for i in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for n in row:
            seq, p = seqs[n], prompt_lens[n]
            span = slice(at, at + len(seq))
            input_ids[r, span] = torch.tensor(seq)
            position_ids[r, span] = torch.arange(len(seq))
            labels[r, at + p - 1 : at + len(seq) - 1] = torch.tensor(seq[p:])
            sequence_ids[r, span] = n
            at += len(seq)
        position_ids[r, at:] = torch.arange(length - at)
    return dict(
        input_ids=input_ids, position_ids=position_ids, labels=labels, sequence_ids=sequence_ids
    )


def model_batch(pairs: list[Pair], pad_id: int, *, padding_free: bool, row_length: int):
    """(batch, real tokens): the micro-batch as the models take it, padded (``collate``:
    ``attention_mask``) or packed (``collate_packed``: ``position_ids``, ``sequence_ids``,
    ``num_pairs``, no mask). Absent entries are None; ``fsdp.preference_forward`` runs it."""
    if padding_free:
        batch = collate_packed(pairs, pad_id, row_length)
        batch.update(attention_mask=None, num_pairs=len(pairs))
        return batch, int((batch["sequence_ids"] >= 0).sum())
    batch = collate(pairs, pad_id)
    batch.update(position_ids=None, sequence_ids=None, num_pairs=None)
    return batch, int(batch["attention_mask"].sum())
