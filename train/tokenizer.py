"""The model's tokenizer: one token per byte (ids 0-255 are the byte values) plus <s>, </s> and
<pad>, saved in HF format (tokenizer.json) so AutoTokenizer loads it with the model."""

import json
import os

BOS, EOS, PAD = 256, 257, 258
VOCAB = 320  # 259 used; a multiple of 64 for the embedding


def _byte_chars():
    """The printable character the byte-level pre-tokenizer maps each byte to (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _byte_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    assert fast.convert_tokens_to_ids(["<s>", "</s>", "<pad>"]) == [BOS, EOS, PAD]
    return fast


def save_tokenizer(path: str) -> None:
    fast = build()
    fast.save_pretrained(path)
    text = "Check: bytes 0-255 map to ids 0-255. \u00e9\n"
    assert fast(text, add_special_tokens=False).input_ids == list(text.encode())
    with open(os.path.join(path, "tokenizer_note.json"), "w") as f:
        json.dump({"kind": "bytes", "bos": BOS, "eos": EOS, "pad": PAD, "vocab": VOCAB}, f)
