"""Words, tokens and how two prompts line up: what Prompt-to-Prompt needs from the tokenizer.

Positions are indices into the padded token sequence the text encoder reads (position 0 is the
start token), i.e. into the last axis of a cross-attention map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of `prompt` with start and end tokens, unpadded."""
    return tokenizer(prompt, truncation=False).input_ids


def word_token_indices(
    tokenizer: PreTrainedTokenizerBase, prompt: str, word: str | int
) -> list[int]:
    """Token positions of a word of `prompt` (1-based, since position 0 is the start token).

    Args:
        tokenizer: the pipeline's tokenizer.
        prompt (`str`): words separated by spaces.
        word (`str` or `int`): the word itself (every occurrence counts) or its index in
            ``prompt.split()``. A word the tokenizer splits into several tokens gets all of them.

    Returns:
        `list[int]`: positions, ascending.

    Raises:
        ValueError: if the word is not in the prompt.
    """
    words = prompt.split()
    spans, pos = [], 1
    for w in words:
        n = len(tokenizer.tokenize(w))
        spans.append(list(range(pos, pos + n)))
        pos += n
    if pos != len(prompt_tokens(tokenizer, prompt)) - 1:  # pragma: no cover - tokenizer quirk
        raise ValueError(f"could not map the words of {prompt!r} to its tokens")
    if isinstance(word, int):
        if not -len(words) <= word < len(words):
            raise ValueError(f"word index {word} out of range for {prompt!r} ({len(words)} words)")
        return spans[word]
    hits = [i for i, w in enumerate(words) if w == word]
    if not hits:
        raise ValueError(f"word {word!r} is not in prompt {prompt!r}")
    return [p for i in hits for p in spans[i]]


def replace_mapper(tokenizer: PreTrainedTokenizerBase, source: str, target: str) -> torch.Tensor:
    """Token mapper for a word swap: the identity (L, L), after checking the prompts align.

    Raises:
        ValueError: if the prompts differ in token count, with the advice to use refinement.
    """
    a, b = prompt_tokens(tokenizer, source), prompt_tokens(tokenizer, target)
    if len(a) != len(b):
        raise ValueError(
            f"a replace (word swap) edit needs prompts that align token for token, but {source!r} "
            f"has {len(a) - 2} tokens and {target!r} has {len(b) - 2}. Swap words that are one "
            "token each, or use a refinement edit (Refine), which aligns prompts of different "
            "lengths."
        )
    return torch.eye(tokenizer.model_max_length)


@dataclass(frozen=True)
class Alignment:
    """How a target prompt's tokens take a source prompt's.

    Attributes:
        mapper (`torch.Tensor`): (L,) int64: the source position each target position reads from.
        alphas (`torch.Tensor`): (L,) float: 1 where the target token exists in the source (take the
            source's map), 0 for new tokens (keep their own).
    """

    mapper: torch.Tensor
    alphas: torch.Tensor


def refine_alignment(tokenizer: PreTrainedTokenizerBase, source: str, target: str) -> Alignment:
    """Align target tokens to source tokens for a refinement edit (words added or changed).

    A longest-common-subsequence alignment of the two token sequences (start and end tokens
    included): tokens in it map to their source partner; other target tokens are new. Padding after
    the target's end token maps to the source's padding, position by position.
    """
    a, b = prompt_tokens(tokenizer, source), prompt_tokens(tokenizer, target)
    n, m, max_len = len(a), len(b), tokenizer.model_max_length
    # LCS table: best[i][j] = LCS length of a[i:], b[j:]
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i][j] = (
                best[i + 1][j + 1] + 1 if a[i] == b[j] else max(best[i + 1][j], best[i][j + 1])
            )
    mapper = torch.zeros(max_len, dtype=torch.long)
    alphas = torch.zeros(max_len)
    i = j = 0
    while i < n and j < m:
        if a[i] == b[j]:
            mapper[j], alphas[j] = i, 1.0
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    tail = torch.arange(m, max_len)
    mapper[m:] = (n + tail - m).clamp(max=max_len - 1)
    alphas[m:] = 1.0
    return Alignment(mapper, alphas)
