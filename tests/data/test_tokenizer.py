"""Tokenizer helpers: the offline tiny BPE, special-token lookup, save/load, encode without BOS."""

from __future__ import annotations

import dataclasses

import pytest

from unigendet.data.tokenizer import (
    SPECIAL_TOKENS,
    SpecialTokenIds,
    build_tiny_tokenizer,
    encode_text,
    load_tokenizer,
    special_token_ids,
)

CORPUS = [
    "This is a real image. The lighting and shadows are consistent.",
    "This is a fake image. The hands have six fingers and the text is garbled.",
    "A photo of a cat sitting on a red mat next to a window.",
    "Is this image real or fake? Answer with an explanation.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
] * 4

SAMPLES = [
    "This is a fake image.",
    "Unseen wörds, émojis 🙂 and 中文 still round-trip.",
    "  leading spaces\nand\ttabs  ",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(CORPUS, vocab_size=320)


def test_round_trip(tok):
    for text in SAMPLES:
        ids = encode_text(tok, text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text


def test_vocab_size_bound_and_learnt_merges(tok):
    assert len(tok) <= 320
    # Merges were learnt: a frequent word takes fewer tokens than its bytes.
    assert len(encode_text(tok, "This is a fake image.")) < len("This is a fake image.")


def test_special_tokens_are_single_ids_and_distinct(tok):
    ids = special_token_ids(tok)
    assert isinstance(ids, SpecialTokenIds)
    values = [ids.bos, ids.eos, ids.start_of_image, ids.end_of_image, ids.pad]
    assert len(set(values)) == 5
    for role, token in SPECIAL_TOKENS.items():
        assert encode_text(tok, token) == [getattr(ids, role)]
    # Appended after the BPE vocabulary, in Qwen2.5's relative order.
    assert ids.pad < ids.bos < ids.eos < ids.start_of_image < ids.end_of_image
    assert ids.end_of_image == len(tok) - 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        SpecialTokenIds(1, 2, 3, 4, 5).bos = 0  # frozen


def test_special_ids_never_produced_by_ordinary_text(tok):
    special = set(vars(special_token_ids(tok)).values())
    for text in CORPUS + SAMPLES + ["<|im_start", "im_end|>", "< |vision_start| >", "<|endoftext"]:
        assert special.isdisjoint(encode_text(tok, text)), text


def test_markers_are_not_split_and_skipped_on_decode(tok):
    ids = special_token_ids(tok)
    text_ids = encode_text(tok, "a red cat")
    seq = [ids.bos, *text_ids, ids.eos, ids.start_of_image, ids.end_of_image, ids.pad]
    assert tok.decode(seq, skip_special_tokens=True) == "a red cat"
    assert tok.decode(seq) == "<|im_start|>a red cat<|im_end|><|vision_start|><|vision_end|><|endoftext|>"
    mixed = encode_text(tok, "<|im_start|>a red cat<|im_end|>")
    assert mixed == [ids.bos, *text_ids, ids.eos]


def test_encode_adds_no_bos_or_eos(tok):
    ids = special_token_ids(tok)
    enc = encode_text(tok, "a red cat")
    assert enc and enc[0] != ids.bos and enc[-1] != ids.eos
    assert enc == tok.encode("a red cat", add_special_tokens=False)
    assert encode_text(tok, "") == []


def test_deterministic(tok):
    again = build_tiny_tokenizer(iter(CORPUS), vocab_size=320)  # a generator corpus works too
    assert again.get_vocab() == tok.get_vocab()
    for text in SAMPLES:
        assert encode_text(again, text) == encode_text(tok, text)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(CORPUS, vocab_size=100)


def test_save_load_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert len(loaded) == len(tok)
    assert loaded.get_vocab() == tok.get_vocab()
    assert special_token_ids(loaded) == special_token_ids(tok)
    for text in SAMPLES + ["<|im_start|>x<|im_end|>"]:
        assert encode_text(loaded, text) == encode_text(tok, text)
    assert loaded.decode(encode_text(loaded, SAMPLES[1])) == SAMPLES[1]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


class _FakeTokenizer:
    """Minimal stand-in: a vocabulary lacking some markers, with or without an unk token."""

    def __init__(self, vocab, unk_token=None):
        self.vocab = vocab
        self.unk_token = unk_token
        self.unk_token_id = vocab.get(unk_token) if unk_token else None

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)


def test_special_token_ids_error_names_missing_token():
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS.values())}
    del vocab["<|vision_end|>"]
    with pytest.raises(ValueError, match=r"end_of_image=<\|vision_end\|>") as err:
        special_token_ids(_FakeTokenizer(vocab))
    assert "<|vision_start|>" not in str(err.value).split(";")[0]

    # With an unk token the lookup returns unk's id for unknown tokens: still reported as missing.
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3}
    with pytest.raises(ValueError) as err:
        special_token_ids(_FakeTokenizer(vocab, unk_token="<unk>"))
    msg = str(err.value).split(";")[0]
    assert "<|vision_start|>" in msg and "<|vision_end|>" in msg and "<|im_start|>" not in msg
