"""Tiny tokenizers for the tiny test models: byte-level BPE vocabularies in which chosen words are single tokens.

    vocab, merges = bpe(byte_alphabet(), [list(w) for w in words] + [["Ġ", *w] for w in words])

Shared by the families whose text encoders use byte-level BPE (models/<family>/tiny_text.py, tiny.py); the
tokenizers are built from fixed word lists, so every build writes the same files.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers


def bpe(alphabet: list[str], words: list[list[str]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocab (alphabet first) and merges under which each word (a list of symbols) is one token.

    Each word gets merges of lower priority than all before it, joining what the earlier merges leave of
    it from the left, so the earlier words keep their single tokens.
    """
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    ranks: dict[tuple[str, str], int] = {}
    for symbols in words:
        tokens = merge(list(symbols), ranks)
        while len(tokens) > 1:
            ranks[(tokens[0], tokens[1])] = len(ranks)
            tokens = [tokens[0] + tokens[1], *tokens[2:]]
            vocab.setdefault(tokens[0], len(vocab))
    return vocab, list(ranks)


def merge(tokens: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE: merge the adjacent pair of lowest rank until no pair has one."""
    while True:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(tokens, tokens[1:])) if pair in ranks]
        if not ranked:
            return tokens
        i = min(ranked)[1]
        tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]


def byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


