"""The embedded model's tokenizer: a real `CLIPTokenizer` over a vocabulary written here.

CLIP's byte-pair encoding needs a vocabulary and merge rules. We write both from the shapes world's
words: every letter (alone and word-final, ``x</w>``) so that *any* lowercase text still tokenizes,
plus merge rules that make each world word a single token. Words outside the world fall apart into
several tokens (``"reddish"`` -> ``re d d i s h``), which is exactly the multi-token case that
Prompt-to-Prompt's word-to-token mapping must handle.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

from nti_utils.shapes.world import BACKGROUNDS, OBJECT_COLORS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
GRAMMAR_WORDS = ("a", "and", "on", "background")
EXTRA_WORDS = ("an", "the", "big", "small", "with", "of", "in")
"""Common words given their own token though the world's grammar does not use them."""


def world_words() -> tuple[str, ...]:
    """Every word that gets a single token, in a fixed order."""
    return (*GRAMMAR_WORDS, *OBJECT_COLORS, *BACKGROUNDS, *SHAPES, *EXTRA_WORDS)


def build_tokenizer(model_max_length: int = 20) -> CLIPTokenizer:
    """Build the tokenizer: letters + world words, with merges such that each world word is one
    token.

    Args:
        model_max_length (`int`, defaults to 20): padded length of every prompt (SD uses 77); must
            equal the text encoder's ``max_position_embeddings``.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []

    def make() -> CLIPTokenizer:
        return CLIPTokenizer(
            vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length
        )

    # BPE applies merges by rank across the whole word, so a merge made for one word can break up
    # another (``r e`` from "red" splits "green" as g|re|e|n). Repeat: tokenize each word and append
    # merges that join whatever pieces it still falls into, until every word is one token.
    for _ in range(10):
        tok = make()
        pending = [w for w in world_words() if len(tok.tokenize(w)) != 1]
        if not pending:
            return tok
        for word in pending:
            pieces = tok.tokenize(word)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in merges:
                    merges.append(pair)
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                vocab.setdefault(pieces[0], len(vocab))
    raise RuntimeError("could not make every world word a single token")  # pragma: no cover
