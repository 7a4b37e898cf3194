"""Qwen2.5 tokenizer access and the special tokens BAGEL/UniGenDet rely on.

BAGEL uses the Qwen2 byte-level BPE tokenizer unchanged: the four marker tokens it needs (and the pad
token) already exist as special tokens, so nothing is added and the embedding table is not resized.
``encode`` never adds a BOS; the packer (not the tokenizer) wraps every text block as
``<|im_start|> ids <|im_end|>`` and every image block as ``<|vision_start|> ... <|vision_end|>``.

``build_tiny_tokenizer`` trains a Qwen2-like tokenizer on a small corpus fully offline, for tests and the
CPU demo, where the 151k-token Qwen vocabulary would be pointless and is not available anyway.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unigendet.data.quality import BadSample

if TYPE_CHECKING:  # transformers is imported lazily: AutoTokenizer alone costs seconds at import time
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
    "pad": "<|endoftext|>",
}

# Order in which the tiny tokenizer appends the special tokens after its BPE vocabulary; it mirrors the
# relative order in Qwen2.5 (151643 endoftext, 151644 im_start, 151645 im_end, 151652/151653 vision).
_TINY_SPECIAL_ORDER = ("pad", "bos", "eos", "start_of_image", "end_of_image")

# Qwen2's pre-tokenisation regex (contractions, letter runs with one optional leading non-letter, single
# digits, punctuation runs, newlines, whitespace). Splitting digits one by one matters for numbers.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Files by which a directory is recognisably a tokenizer: a fast tokenizer.json, or the slow
# Qwen2Tokenizer's vocab/merges pair (what BAGEL ships).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
_TOKENIZER_JSON_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json", "added_tokens.json"
)


@dataclass(frozen=True)
class SpecialTokenIds:
    bos: int
    eos: int
    start_of_image: int
    end_of_image: int
    pad: int


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
    """Ids of the five special tokens; ValueError naming every token the tokenizer lacks."""
    ids: dict[str, int] = {}
    missing: list[str] = []
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unk_token = getattr(tokenizer, "unk_token", None)
    for role, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        # Tokenizers without an unk token return None for unknown strings; those with one map the
        # unknown token to unk_id, which must not be mistaken for the real marker.
        if token_id is None or (unk_id is not None and token_id == unk_id and token != unk_token):
            missing.append(f"{role}={token}")
        else:
            ids[role] = int(token_id)
    if missing:
        raise ValueError(
            f"tokenizer lacks special token(s) {', '.join(missing)}; BAGEL expects all of "
            f"{sorted(SPECIAL_TOKENS.values())} to exist (Qwen2.5 tokenizer)"
        )
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"special tokens share ids: {ids}")
    return SpecialTokenIds(**ids)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory only (no hub access)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    present = [name for name in _TOKENIZER_FILES if (path / name).is_file()]
    has_fast = "tokenizer.json" in present
    has_slow = "vocab.json" in present and "merges.txt" in present
    if not (has_fast or has_slow):
        raise FileNotFoundError(
            f"{path} holds no tokenizer files: expected tokenizer.json, or vocab.json + merges.txt "
            f"(found: {', '.join(present) or 'none of them'})"
        )
    from transformers import AutoTokenizer, PretrainedConfig

    extra = {}
    if _holds_unigendet_config(path):
        # Our config.json (model_type "unigendet") is no transformers model config; the tokenizer class is named
        # in tokenizer_config.json, so an empty config spares AutoConfig's failed lookup and its warning.
        extra["config"] = PretrainedConfig()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **extra)
    except Exception as err:  # a malformed file surfaces as JSONDecodeError, KeyError or a tokenizers Exception
        culprit = _unparsable_file(path)
        raise OSError(f"could not load the tokenizer from {culprit}: {type(err).__name__}: {err}") from err
    logger.debug("loaded tokenizer %s from %s (%d tokens)", type(tokenizer).__name__, path, len(tokenizer))
    return tokenizer


def _holds_unigendet_config(directory: Path) -> bool:
    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == "unigendet"
    except (OSError, ValueError, AttributeError):
        return False


def _unparsable_file(directory: Path) -> Path:
    """The first tokenizer JSON file in ``directory`` that does not parse, to name it in the error; the
    directory itself when they all parse (the problem is then in their content)."""
    for name in _TOKENIZER_JSON_FILES:
        candidate = directory / name
        if candidate.is_file():
            try:
                json.loads(candidate.read_text(encoding="utf-8"))
            except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                return candidate
    return directory


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small Qwen2-style byte-level BPE on ``corpus``, offline and deterministically.

    ``vocab_size`` bounds the whole vocabulary including the five special tokens, which are appended
    after the learnt BPE vocabulary (as in Qwen2.5) and registered as special, so they are never split
    and ``decode(skip_special_tokens=True)`` drops them. A small corpus may yield fewer tokens.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    n_special = len(SPECIAL_TOKENS)
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + n_special:
        raise ValueError(f"vocab_size must be at least {n_bytes + n_special} (256 byte symbols + special tokens)")

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Same pipeline as Qwen2's tokenizer.json: NFC, regex split, byte-level mapping without a prefix space.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=1,
        # The full byte alphabet guarantees any text (any language, emoji) encodes without unk.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Materialise so a generator corpus is consumed exactly once and in order (training is deterministic
    # for a given sequence of texts).
    texts = [str(t) for t in corpus]
    tok.train_from_iterator(texts, trainer=trainer)

    # Added after training so they take the ids right after the BPE vocabulary, in Qwen's order.
    tok.add_special_tokens(
        [AddedToken(SPECIAL_TOKENS[role], special=True, normalized=False) for role in _TINY_SPECIAL_ORDER]
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        # Qwen2.5 has no BOS token in its config; BAGEL's "bos" (<|im_start|>) is inserted by the packer.
        bos_token=None,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens=[SPECIAL_TOKENS[r] for r in ("bos", "start_of_image", "end_of_image")],
    )
    logger.debug("trained tiny tokenizer: %d tokens from %d texts", len(wrapped), len(texts))
    return wrapped


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (BAGEL adds no BOS/EOS at encode time).

    A literal marker string inside ``text`` (e.g. "<|im_end|>") is still recognised as that special
    token, exactly as in the reference tokenizer. Text that is not valid Unicode is a ``BadSample``
    (``bad_text``), see :func:`check_text`.
    """
    check_text(text, "text")
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_text(text: str, where: str) -> None:
    """BadSample ``bad_text`` if ``text`` cannot be encoded as UTF-8, i.e. holds a lone surrogate such as
    ``"\\ud800"`` (which JSON escapes can produce). Such text is exactly what the Rust tokenizers cannot take:
    they would fail with a TypeError that names neither the record nor the problem."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadSample(
            "bad_text", f"{where}: not valid Unicode ({err.reason}: {text[err.start:err.end]!r} at {err.start})"
        ) from None
