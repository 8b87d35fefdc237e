"""A byte-level tokenizer that needs no download, for the embedded default model.

256 byte tokens plus <bos>, <eos>, <pad> and <unk>, as a real ``PreTrainedTokenizerFast`` (it
saves with ``save_pretrained`` and loads back with ``AutoTokenizer``), with a minimal chat
template so that conversational datasets work with the default model too.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps every byte to one printable character; order them by byte value.
    ordered = sorted(byte_to_unicode, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(ordered)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_of(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to
    # 256 + their rank among the non-printable ones.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
