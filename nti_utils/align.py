"""Words, tokens and how two prompts line up: what Prompt-to-Prompt needs from the tokenizer.

Positions are indices into the padded token sequence the text encoder reads (position 0 is the
start token), i.e. into the last axis of a cross-attention map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\w\s]|_)+", re.IGNORECASE)
"""How CLIP's tokenizer splits text before byte-pair encoding: letter runs, single digits, runs of
other characters (punctuation, symbols, emoji), and English contractions."""


def _check_str(prompt: object, what: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"{what} must be a string, got {type(prompt).__name__} ({prompt!r})")
    return prompt


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of `prompt` with start and end tokens, unpadded."""
    return tokenizer(_check_str(prompt), truncation=False).input_ids


def _ranges(chars: list[str]) -> str:
    """``["a", "b", "c", "x"]`` -> ``"a-c x"``."""
    out, run = [], []
    for c in sorted(chars) + [None]:
        if run and c is not None and ord(c) == ord(run[-1]) + 1:
            run.append(c)
            continue
        if run:
            out.append(run[0] if len(run) < 3 else f"{run[0]}-{run[-1]}")
            if len(run) == 2:
                out.append(run[1])
        run = [c] if c is not None else []
    return " ".join(out)


def check_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, what: str = "prompt") -> str:
    """Check that the model's text encoder reads `prompt` as written; return it.

    A character the tokenizer has no token for becomes its unknown token, which for CLIP tokenizers
    is the end-of-text token: in the middle of a prompt the text encoder then reads the prompt as
    ending there (the embedded model's tokenizer, for one, knows only the letters a-z, so digits,
    punctuation and emoji all do this). Such prompts are refused, naming the characters.

    Args:
        tokenizer: the pipeline's tokenizer.
        prompt (`str`): the prompt.
        what (`str`, defaults to ``"prompt"``): how error messages call it.

    Raises:
        TypeError: `prompt` is not a string.
        ValueError: it has characters the tokenizer cannot represent, an end-of-text token in the
            middle, or more tokens than the model reads.
    """
    ids = prompt_tokens(tokenizer, _check_str(prompt, what))
    max_len = tokenizer.model_max_length
    if len(ids) > max_len:
        raise ValueError(
            f"{what} {prompt!r} has {len(ids)} tokens with start/end, more than the {max_len} this "
            "model reads; shorten it"
        )
    bad_ids = {i for i in (tokenizer.unk_token_id, tokenizer.eos_token_id) if i is not None}
    chars = [c for c in dict.fromkeys(prompt) if not c.isspace()]
    per_char = tokenizer(chars, add_special_tokens=False).input_ids if chars else []
    bad = [c for c, row in zip(chars, per_char) if bad_ids & set(row)]
    if bad:
        printable = [chr(k) for k in range(33, 127)]
        rows = tokenizer(printable, add_special_tokens=False).input_ids
        ok = _ranges([c for c, row in zip(printable, rows) if row and not bad_ids & set(row)])
        raise ValueError(
            f"{what} {prompt!r} has characters this model's tokenizer cannot represent: "
            f"{' '.join(repr(c) for c in bad)}; each would become an end-of-text token in the "
            "middle of the prompt (the text encoder would read the prompt as ending there). "
            f"Remove them or write them as words; of printable ASCII this tokenizer has: {ok}"
        )
    if bad_ids & set(ids[1:-1]):
        raise ValueError(
            f"{what} {prompt!r} holds an end-of-text or unknown token in the middle; remove "
            "special tokens such as '<|endoftext|>' from the text"
        )
    return prompt


def _word_spans(
    tokenizer: PreTrainedTokenizerBase, words: list[str], split: bool
) -> list[list[tuple[str, int]]]:
    """Per whitespace word, its pieces (the word itself unless `split`) with their token counts."""
    out = []
    for w in words:
        pieces = _PIECES.findall(w) if split else [w]
        out.append([(p, len(tokenizer.tokenize(p))) for p in pieces or [w]])
    return out


def word_token_indices(
    tokenizer: PreTrainedTokenizerBase, prompt: str, word: str | int
) -> list[int]:
    """Token positions of a word of `prompt` (1-based, since position 0 is the start token).

    Punctuation next to a word has tokens of its own and is not part of the word: in
    ``"a red circle, on a white background"`` the word ``"circle"`` is the token of ``circle``,
    not that of the comma (``"circle,"``, as written, gives both).

    Args:
        tokenizer: the pipeline's tokenizer.
        prompt (`str`): words separated by spaces.
        word (`str` or `int`): the word itself (every occurrence counts; matched case-insensitively
            when it is not found as written) or its index in ``prompt.split()`` (its letters and
            digits, without punctuation around them). A word the tokenizer splits into several
            tokens gets all of them.

    Returns:
        `list[int]`: positions, ascending.

    Raises:
        TypeError: `prompt` is not a string, or `word` neither a string nor an integer.
        ValueError: if the word is not in the prompt.
    """
    _check_str(prompt)
    if isinstance(word, bool) or not isinstance(word, (str, int)):
        raise TypeError(
            f"word must be a string or a word index, got {type(word).__name__} ({word!r})"
        )
    words = prompt.split()
    n_tokens = len(prompt_tokens(tokenizer, prompt)) - 2
    for split in (True, False):  # pieces as CLIP splits them; whole words if that does not add up
        spans = _word_spans(tokenizer, words, split)
        if sum(n for pieces in spans for _, n in pieces) == n_tokens:
            break
    else:  # pragma: no cover - tokenizer quirk
        raise ValueError(f"could not map the words of {prompt!r} to its tokens")
    positions, pos = [], 1  # per word: [(piece, [positions])]
    for pieces in spans:
        positions.append([])
        for p, n in pieces:
            positions[-1].append((p, list(range(pos, pos + n))))
            pos += n

    def core(pieces):  # a word's letters and digits, or all of it if it has none
        kept = [idx for p, idx in pieces if any(ch.isalnum() for ch in p)]
        return [i for idx in (kept or [idx for _, idx in pieces]) for i in idx]

    if isinstance(word, int):
        if not -len(words) <= word < len(words):
            raise ValueError(f"word index {word} out of range for {prompt!r} ({len(words)} words)")
        return core(positions[word])
    target = word.strip()
    if not target or len(target.split()) > 1:
        raise ValueError(f"word must be one word without spaces, got {word!r}")
    for same in (str.__eq__, lambda a, b: a.lower() == b.lower()):
        hits = []
        for w, pieces in zip(words, positions):
            if same(w, target):
                hits += [i for _, idx in pieces for i in idx]
            else:
                hits += [i for p, idx in pieces if same(p, target) for i in idx]
        if hits:
            return sorted(hits)
    known = sorted({p for pieces in positions for p, _ in pieces if any(c.isalnum() for c in p)})
    raise ValueError(f"word {word!r} is not in prompt {prompt!r} (its words: {', '.join(known)})")


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


def swap_words(prompt: str, swaps: dict[str, str]) -> str:
    """`prompt` with whole words replaced: ``swap_words("a red circle", {"circle": "square"})``
    gives ``"a red square"`` (the word-swap edit of a prompt you did not write, e.g. a caption).

    Args:
        prompt (`str`): the source prompt.
        swaps (`dict[str, str]`): word -> replacement; each word must occur in `prompt` as a whole
            word (case-sensitive), and every occurrence is replaced.

    Raises:
        ValueError: a word that is not in the prompt, an empty replacement, or no swaps.
        TypeError: words or replacements that are not strings.
    """
    _check_str(prompt)
    if not isinstance(swaps, dict) or not swaps:
        raise ValueError(f"swaps must be a non-empty dict word -> replacement, got {swaps!r}")
    for word, new in swaps.items():
        _check_str(word, "a swapped word")
        _check_str(new, f"the replacement of {word!r}")
        if not new.strip():
            raise ValueError(f"the replacement of {word!r} is empty")
        if not re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt):
            raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")
    words = "|".join(re.escape(w) for w in sorted(swaps, key=len, reverse=True))
    # one pass, so that {"red": "blue", "blue": "red"} swaps the two colors
    return re.sub(rf"(?<!\w)(?:{words})(?!\w)", lambda m: swaps[m.group(0)], prompt)
