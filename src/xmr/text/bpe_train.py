"""Learn CLIP-style byte-level BPE merges from captions (for demos without CLIP's vocabulary).

Words are prepared exactly as :class:`xmr.text.tokenizer.ClipTokenizer` prepares them (CLIP cleaning,
pre-tokenisation regex, byte-to-unicode map, ``</w>`` on the last symbol), so
``ClipTokenizer.from_merges(train_bpe(captions, 2000))`` encodes any text: unseen characters fall back
to the 256 byte symbols that every vocabulary holds.

Algorithm: count distinct words once, then keep pair counts (weighted by word frequency) and, per
pair, the words it occurs in. Each step takes the most frequent pair from a lazy max-heap (ties broken
by the lexicographically smallest pair), merges it in the affected words only, and updates the
counts of the pairs those words gained or lost.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable

from xmr.errors import ConfigError
from xmr.text.tokenizer import END_OF_WORD, EOT_TOKEN, SOT_TOKEN, _merge_pair, pretokenize

__all__ = ["count_words", "train_bpe"]

Pair = tuple[str, str]


def count_words(texts: Iterable[str]) -> Counter[str]:
    """Frequencies of the byte-mapped words (without ``</w>``) of ``texts``; literal special tokens
    are skipped, since they never go through BPE."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in pretokenize(text) if w not in (SOT_TOKEN, EOT_TOKEN))
    return counts


def _initial_state(
    counts: Counter[str],
) -> tuple[list[list[str]], list[int], dict[Pair, int], dict[Pair, set[int]]]:
    """Words as symbol lists (sorted for determinism), their frequencies, pair counts and the index of
    which words hold which pair."""
    words: list[list[str]] = []
    freqs: list[int] = []
    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for index, word in enumerate(sorted(counts)):
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        words.append(symbols)
        freqs.append(counts[word])
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += counts[word]
            where[pair].add(index)
    return words, freqs, pair_counts, where


def _apply_merge(
    pair: Pair,
    words: list[list[str]],
    freqs: list[int],
    pair_counts: dict[Pair, int],
    where: dict[Pair, set[int]],
) -> set[Pair]:
    """Merge ``pair`` in every word that holds it; update counts and index; return the changed pairs."""
    changed: set[Pair] = set()
    for index in sorted(where.pop(pair, ())):
        old = words[index]
        new = _merge_pair(old, pair)
        if len(new) == len(old):  # stale index entry: the pair left this word earlier
            continue
        freq = freqs[index]
        for old_pair in itertools.pairwise(old):
            pair_counts[old_pair] -= freq
            changed.add(old_pair)
        for new_pair in itertools.pairwise(new):
            pair_counts[new_pair] += freq
            where[new_pair].add(index)
            changed.add(new_pair)
        words[index] = new
    return changed


def train_bpe(texts: Iterable[str], num_merges: int, min_frequency: int = 2) -> list[Pair]:
    """Learn up to ``num_merges`` merges, most frequent pair first; stop early when the best pair occurs
    fewer than ``min_frequency`` times. Deterministic: equal counts go to the smallest pair."""
    if num_merges < 0:
        raise ConfigError(f"num_merges must be >= 0, got {num_merges}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be >= 1, got {min_frequency}")
    words, freqs, pair_counts, where = _initial_state(count_words(texts))
    # Max-heap via negated counts; stale entries are skipped when popped (lazy deletion).
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while heap and len(merges) < num_merges:
        negative, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -negative:
            continue
        if count < min_frequency:
            break
        merges.append((a, b))
        del pair_counts[(a, b)]
        for pair in _apply_merge((a, b), words, freqs, pair_counts, where):
            if pair_counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
            else:
                pair_counts.pop(pair, None)
    return merges
