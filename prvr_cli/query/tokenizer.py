"""CLIP's byte-level BPE tokenizer, without torch: the same ids as open_clip's `SimpleTokenizer` (clean="lower").

Text is repaired (ftfy), HTML-unescaped twice, whitespace-collapsed and lower-cased, then split
into words (letters, single digits, runs of other symbols, English contractions); each word's
UTF-8 bytes map to printable characters and are merged pair by pair in the order of the merge
list, the last symbol carrying an end-of-word mark. A sequence is [start] + ids + [end], cut to
the context length with the end token kept last.
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path

import ftfy
import numpy as np
import regex

START, END = "<start_of_text>", "<end_of_text>"
N_MERGES = 49152 - 256 - 2   # CLIP's vocabulary: 256 bytes x 2 (with end-of-word) + merges + 2 special tokens


def byte_symbols() -> dict[int, str]:
    """The printable character standing for each byte (printable Latin-1 bytes stand for themselves, the others
    for characters from U+0100 on), in vocabulary order: the printable bytes first."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """Text -> CLIP token ids; `vocab` is the gzipped merge list open_clip ships (`bpe_simple_vocab_16e6.txt.gz`)."""

    def __init__(self, vocab: str | Path, context_length: int = 77):
        merges = gzip.open(vocab).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
        pairs = [tuple(line.split()) for line in merges]
        self.byte_symbol = byte_symbols()
        singles = list(self.byte_symbol.values())
        symbols = singles + [s + "</w>" for s in singles] + ["".join(p) for p in pairs]
        self.ids = {s: i for i, s in enumerate(symbols + [START, END])}
        self.merge_rank = {p: r for r, p in enumerate(pairs)}
        self.start, self.end = self.ids[START], self.ids[END]
        self.context_length = context_length
        self.words = regex.compile(rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
                                   regex.IGNORECASE)
        self._known: dict[str, list[int]] = {START: [self.start], END: [self.end]}

    def _word_ids(self, word: str) -> list[int]:
        """Ids of one word: its byte symbols merged by rank until no listed pair remains."""
        if word in self._known:
            return self._known[word]
        parts = [self.byte_symbol[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            rank, first = min((self.merge_rank.get(p, N_MERGES), i) for i, p in enumerate(zip(parts, parts[1:])))
            if rank == N_MERGES:
                break
            pair = (parts[first], parts[first + 1])
            merged, i = [], 0
            while i < len(parts):      # merge every non-overlapping occurrence of the pair, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.ids[p] for p in parts]
        self._known[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the start and end tokens and uncut."""
        return [i for word in self.words.findall(clean(text)) for i in self._word_ids(word)]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int64 [N, context_length]: start, ids, end, zero padding; overlong texts cut with the end token last."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.start, *self.encode(text), self.end][: self.context_length]
            ids[-1] = self.end
            out[row, : len(ids)] = ids
        return out

    def cut_tokens(self, text: str) -> int:
        """How many of `text`'s tokens fall beyond the context (and are ignored); 0 if it fits."""
        return max(0, len(self.encode(text)) + 2 - self.context_length)
