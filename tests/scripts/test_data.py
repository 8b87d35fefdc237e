"""train/data.py: file formats, TRL's prompt split, provenance, skipped rows, truncation notes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]

from train.data import (  # noqa: E402
    DataError,
    Row,
    collate,
    collate_packed,
    extract_prompt,
    load_rows,
    split_row,
    tokenize_rows,
)
from train.hh_format import hh_rows, write_hh_jsonl_gz  # noqa: E402
from train.tokenizer import byte_tokenizer  # noqa: E402

HH = "\n\nHuman: Is it safe?\n\nAssistant:"

# (chosen, rejected) → (prompt, chosen, rejected), each worked out from TRL's extract_prompt:
# the prompt ends where the two first differ, one character earlier if that one is a space.
SPLITS = [
    pytest.param(
        HH + " I think so.",
        HH + " I don't know.",
        (HH + " I", " think so.", " don't know."),
        id="shared-first-word",
    ),
    pytest.param(
        HH + " I'm sure.",
        HH + " I'd say no.",
        (HH + " I'", "m sure.", "d say no."),
        id="split-inside-a-word",
    ),
    pytest.param(
        HH + " Yes.",
        HH + " Yes. And more.",
        (HH + " Yes", ".", ". And more."),
        id="chosen-prefix-of-rejected",
    ),
    pytest.param(
        HH + " No, never.",
        HH + " No",
        (HH + " N", "o, never.", "o"),
        id="rejected-prefix-of-chosen",
    ),
    pytest.param("abc", "xbc", ("", "abc", "xbc"), id="differ-at-first-char"),
    pytest.param(
        [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
        (
            [{"role": "user", "content": "Sky?"}],
            [{"role": "assistant", "content": "Blue."}],
            [{"role": "assistant", "content": "Green."}],
        ),
        id="messages",
    ),
    pytest.param(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "More"},
        ],
        (
            [{"role": "user", "content": "Hi"}],
            [{"role": "assistant", "content": "Hello."}],
            [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More"}],
        ),
        id="messages-prefix",
    ),
]


@pytest.mark.parametrize("chosen, rejected, expected", SPLITS)
def test_implicit_prompt_split_matches_trl(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected
    assert split_row(Row({"chosen": chosen, "rejected": rejected}, "x")) == expected


def test_split_agrees_with_trl_itself_on_hh_rows():
    """Where TRL is installed, its own extract_prompt gives the same split on every HH row
    (none of them differ at the first character, the one case where this deliberately differs)."""
    trl_data_utils = pytest.importorskip("trl.data_utils")
    for row in hh_rows(200):
        if row["chosen"] == row["rejected"]:
            continue
        ours = extract_prompt(row["chosen"], row["rejected"])
        theirs = trl_data_utils.extract_prompt(dict(row))
        assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


MESSAGES_PROMPT = [{"role": "user", "content": "Name a red animal."}]
FORMATS = {
    "explicit-string": {
        "prompt": "Name a red animal.",
        "chosen": " a fox.",
        "rejected": " a FOX!!",
    },
    "implicit-string": {
        "chosen": "Name a red animal. a fox.",
        "rejected": "Name a red animal. 4 f0x",
    },
    "explicit-conversational": {
        "prompt": MESSAGES_PROMPT,
        "chosen": [{"role": "assistant", "content": "a fox."}],
        "rejected": [{"role": "assistant", "content": "a FOX!!"}],
    },
    "implicit-conversational": {
        "chosen": MESSAGES_PROMPT + [{"role": "assistant", "content": "a fox."}],
        "rejected": MESSAGES_PROMPT + [{"role": "assistant", "content": "a FOX!!"}],
    },
}


def _tokenize(rows, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 40)
    rows = [r if isinstance(r, Row) else Row(r, f"rows line {i + 1}") for i, r in enumerate(rows)]
    return tokenize_rows(rows, byte_tokenizer(), **kw)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_row_format_tokenizes_with_prompt_masked(name):
    tokenizer = byte_tokenizer()
    (pair,) = _tokenize([FORMATS[name]]).pairs
    prompt = tokenizer.decode(pair.prompt_ids)
    chosen = tokenizer.decode(pair.chosen_ids)
    assert "Name a red animal." in prompt and "fox" not in prompt
    assert "fox." in chosen and chosen.endswith("<eos>")
    if "conversational" in name:
        assert "<|user|>" in prompt and prompt.endswith("<|assistant|>")  # the chat template
    batch = collate([pair], tokenizer.pad_token_id)
    labels = batch["labels"]
    scored = labels[0][labels[0] != -100].tolist()
    assert scored == pair.chosen_ids  # exactly the completion is scored, shifted by one
    assert (labels[:, : len(pair.prompt_ids) - 1] == -100).all()


def test_truncation_left_for_prompt_right_for_completion():
    tokenizer = byte_tokenizer()
    row = {"prompt": "x" * 50 + "END", "chosen": " " + "c" * 50, "rejected": " " + "r" * 50}
    (pair,) = _tokenize([row], max_length=40, max_prompt_length=10).pairs
    assert tokenizer.decode(pair.prompt_ids).endswith("END") and len(pair.prompt_ids) == 10
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 40
    assert tokenizer.decode(pair.chosen_ids).startswith(" ccc")


def test_truncation_that_drops_most_of_a_prompt_is_reported_with_its_share():
    short = {"prompt": "p" * 5, "chosen": " a", "rejected": " b"}
    long_prompt = {"prompt": "p" * 100, "chosen": " a", "rejected": " b"}
    long_completion = {"prompt": "p", "chosen": " " + "c" * 100, "rejected": " r"}
    data = _tokenize(
        [short, long_prompt, long_prompt, long_completion], max_length=40, max_prompt_length=20
    )
    assert (data.prompt_mostly_cut, data.completion_mostly_cut) == (2, 1)
    notes = data.notes("train", max_length=40, max_prompt_length=20)
    assert any(
        "--max-prompt-length 20 cut more than half of the prompt of 2 of 4 pairs (50%)" in n
        for n in notes
    ), notes
    assert any("--max-length 40" in n and "1 of 4 pairs (25%)" in n for n in notes), notes
    assert not _tokenize([short]).notes("train", max_length=64, max_prompt_length=40)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "p", "chosen": "a"}, r"line 2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"line 2: field 'chosen' must be a string"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"line 2: field 'prompt'"),
        ({"chosen": "a", "rejected": [{"role": "user", "content": "b"}]}, r"line 2: 'chosen' and"),
        ("not an object", r"line 2: expected a JSON object"),
    ],
    ids=["missing-field", "wrong-type", "bad-message", "mixed-kinds", "not-object"],
)
def test_malformed_row_names_file_line_and_field(tmp_path, row, match):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(FORMATS["explicit-string"]) + "\n" + json.dumps(row) + "\n")
    train, held_out = load_rows(str(path))
    rows = sorted(train + held_out, key=lambda r: r.where)
    with pytest.raises(DataError, match=f"data.jsonl {match}"):
        _tokenize(rows)


def test_rows_that_cannot_form_a_pair_are_skipped_and_reported_with_their_lines():
    rows = [
        FORMATS["explicit-string"],
        {"chosen": "same", "rejected": "same"},
        FORMATS["implicit-string"],
        {"prompt": "p", "chosen": " x", "rejected": " x"},
    ]
    data = _tokenize(rows)
    assert len(data.pairs) == 2
    assert data.skipped == {"chosen and rejected are identical": ["rows line 2", "rows line 4"]}
    (note,) = data.notes("train", max_length=64, max_prompt_length=40)
    assert note == (
        "train: skipped 2 of 4 rows that cannot form a pair (chosen and rejected "
        "are identical): rows line 2, rows line 4"
    )


def test_identical_after_truncation_is_skipped():
    row = {"prompt": "p", "chosen": " same start, then A", "rejected": " same start, then B"}
    data = _tokenize([row], max_length=8, max_prompt_length=2)
    assert not data.pairs and list(data.skipped) == ["identical after truncation to --max-length 8"]


def test_hh_rlhf_file_as_distributed_loads_with_file_lines(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    rows = write_hh_jsonl_gz(path, n=200)
    train, held_out = load_rows(str(path), seed=0)
    assert len(train) + len(held_out) == 200 and len(held_out) == 10
    # Provenance survives the hold-out shuffle: "line N" is the file's line N.
    for row in train[:20] + held_out:
        line = int(row.where.rsplit(" ", 1)[1])
        assert row.where.startswith(str(path)) and row.data == rows[line - 1]
    data = _tokenize(train + held_out, max_length=128, max_prompt_length=64)
    assert len(data.pairs) == 199  # the one identical row is skipped, prefix rows are kept
    assert data.skipped == {"chosen and rejected are identical": [f"{path} line 6"]}


def test_load_rows_from_json_jsonl_gz_and_directory(tmp_path):
    rows = [FORMATS["explicit-string"]] * 40
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        f.write(json.dumps(rows))
    for name in ("a.json", "b.jsonl", "c.json.gz"):
        train, held_out = load_rows(str(tmp_path / name), seed=0)
        assert len(train) + len(held_out) == 40 and len(held_out) == 2
    assert train[0].where.startswith(str(tmp_path / "c.json.gz") + " item ")
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    with gzip.open(split_dir / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    (split_dir / "test.jsonl").write_text(json.dumps(rows[1]) + "\n")
    assert [len(x) for x in load_rows(str(split_dir))] == [1, 1]


@pytest.mark.parametrize(
    "content, match",
    [("", "no rows"), ("{not json\n", "line 1: not valid JSON"), ("\xff", None)],
    ids=["empty", "bad-json", "not-utf8"],
)
def test_unreadable_files_are_named(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    if content == "\xff":
        path.write_bytes(b"\xff\xfe\x00garbage")
        match = "line 1: cannot read it as UTF-8"
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_rows(str(path))


def test_packed_rows_hold_the_padded_sequences():
    """collate_packed: every sequence whole in one row of at most row_length tokens, positions
    from 0, the labels collate gives it, its sequence id; filler is unscored."""
    pairs = _tokenize(hh_rows(12), max_length=60, max_prompt_length=30).pairs
    padded = collate(pairs, pad_id=0)
    packed = collate_packed(pairs, pad_id=0, row_length=120)
    assert packed["input_ids"].shape[1] <= 120
    lengths = padded["attention_mask"].sum(-1)
    for n, length in enumerate(lengths.tolist()):
        row, cols = (packed["sequence_ids"] == n).nonzero(as_tuple=True)
        assert row.unique().numel() == 1 and cols.numel() == length
        assert torch.equal(cols, cols[0] + torch.arange(length))  # contiguous, whole
        r = int(row[0])
        assert torch.equal(packed["input_ids"][r, cols], padded["input_ids"][n, :length])
        assert torch.equal(packed["labels"][r, cols], padded["labels"][n, :length])
        assert torch.equal(packed["position_ids"][r, cols], torch.arange(length))
    filler = packed["sequence_ids"] < 0
    assert (packed["labels"][filler] == -100).all()
    assert filler.float().mean() < (padded["attention_mask"] == 0).float().mean()


def test_a_byte_order_mark_is_read_and_a_bad_byte_is_named_by_line(tmp_path):
    """A UTF-8 BOM (Windows editors) was refused; a non-UTF-8 byte was reported as a byte
    offset, not a line."""
    row = json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"})
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (row + "\n").encode() * 2)
    assert len(load_rows(str(path))[0]) + len(load_rows(str(path))[1]) == 2
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((row + "\n").encode() * 2 + row.replace("b", "\xe9").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl line 3: cannot read it as UTF-8 .*0xe9"):
        load_rows(str(bad))


def test_a_directory_with_two_files_for_one_split_is_refused(tmp_path):
    row = {"prompt": "a", "chosen": " b", "rejected": " c"}
    (tmp_path / "train.json").write_text(json.dumps([row]))
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="holds both train.json and train.jsonl"):
        load_rows(str(tmp_path))


def test_a_lone_surrogate_names_its_row():
    """JSON's "\\ud800" is a lone surrogate; the tokenizer failed on it with a TypeError."""
    row = json.loads('{"prompt": "a", "chosen": " b\\ud800", "rejected": " c"}')
    with pytest.raises(DataError, match=r"rows line 1: its text holds '\\ud800', a lone UTF-16"):
        _tokenize([row])
