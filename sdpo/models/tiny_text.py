"""Offline tokenizers and tiny text encoders for the tiny pipelines (no hub, random weights).

The CLIP tokenizer is a byte-level BPE whose merges build every vocabulary word, so known words are one token and
any other text still tokenizes byte by byte (never to all ``<|endoftext|>``). The T5 tokenizer is a
Unigram model with whole words scored above single characters.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable

from tokenizers import pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

DEFAULT_VOCABULARY: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting", "drawing", "image",
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "pink", "brown", "grey",
    "circle", "square", "triangle", "star", "cat", "dog", "horse", "bird", "car", "tree", "house", "flower",
    "sky", "sea", "mountain", "city", "person", "man", "woman", "child",
    "small", "big", "large", "bright", "dark", "centred", "offset", "clean", "noisy",
)  # fmt: skip


def build_clip_tokenizer(vocabulary: Iterable[str], *, pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer over every byte, with merges trained so each vocabulary word is one token.

    The merges come from the tokenizers library's BPE trainer run on the vocabulary, with CLIP's own normaliser and
    pre-tokeniser, so applying them reproduces every word whole (hand-made merge chains of different words collide).
    Ids: bytes and merged tokens, then each byte with ``</w>``, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainee = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never the limit: merging stops when every word is one token
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        special_tokens=[],
        show_progress=False,
    )
    trainee.train_from_iterator(list(vocabulary), trainer=trainer)
    trained = json.loads(trainee.to_str())["model"]

    tokens = sorted(trained["vocab"], key=trained["vocab"].__getitem__)
    tokens += [char + END_OF_WORD for char in sorted(alphabet)] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} must be a single byte-level character or {EOS}")
    merges = [tuple(pair) for pair in trained["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(vocabulary: Iterable[str]) -> T5Tokenizer:
    """A Unigram T5 tokenizer: ``<pad> </s> <unk>``, whole words (scored high), then printable ASCII characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {piece for piece, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for word in vocabulary:
        for form in (word, word.lower(), word.capitalize()):
            add("▁" + form, -1.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add(char, -8.0)
        add("▁" + char, -8.5)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int, num_layers: int, **extra: object) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_clip_text_encoder(
    tokenizer: CLIPTokenizer, *, hidden_size: int = 32, num_layers: int = 2, hidden_act: str = "quick_gelu"
) -> CLIPTextModel:
    """A random CLIP text encoder sized for ``tokenizer`` (``hidden_act="gelu"`` mimics OpenCLIP, as in SD2)."""
    return CLIPTextModel(_clip_config(tokenizer, hidden_size, num_layers, hidden_act=hidden_act)).eval()


def build_clip_text_encoder_with_projection(
    tokenizer: CLIPTokenizer, *, hidden_size: int = 32, num_layers: int = 2, projection_dim: int = 32
) -> CLIPTextModelWithProjection:
    """A random CLIP text encoder with a pooled projection (SDXL's second encoder, SD3's first two)."""
    config = _clip_config(tokenizer, hidden_size, num_layers, hidden_act="gelu", projection_dim=projection_dim)
    return CLIPTextModelWithProjection(config).eval()


def build_t5_encoder(tokenizer: T5Tokenizer, *, d_model: int = 64, num_layers: int = 1) -> T5EncoderModel:
    """A random T5 encoder (SD3's third text encoder)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=max(1, d_model // 16),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()
