"""The world's character-level tokenizer: one token per character, a BOS in front of every text."""

from __future__ import annotations

import string

__all__ = ["BOS", "BOS_ID", "EOS", "EOS_ID", "PAD", "PAD_ID", "UNK", "VOCAB", "build_tokenizer", "encode"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
VOCAB: tuple[str, ...] = (PAD, BOS, EOS, UNK, *" +,:=", *string.digits, *string.ascii_lowercase, "A", "Q")
"""Every token; a token's id is its index."""
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
_IDS = {token: i for i, token in enumerate(VOCAB)}


def encode(text: str, *, bos: bool = True) -> list[int]:
    """What ``build_tokenizer()(text)["input_ids"]`` gives, without the tokenizer's overhead (for bulk data)."""
    return [BOS_ID] * bos + [_IDS.get(char, UNK_ID) for char in text]


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over ``VOCAB`` with pad, bos, eos and unk set; decoding round-trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(_IDS), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
