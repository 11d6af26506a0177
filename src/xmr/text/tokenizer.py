"""CLIP byte-level BPE tokenisation, padding/truncation and BERT-style MLM masking.

Re-implements the behaviour of OpenAI CLIP's ``simple_tokenizer`` (text cleaning, pre-tokenisation
regex, byte-to-unicode map, BPE with ``</w>`` end-of-word markers) and adds a ``<|mask|>`` token for
IRRA's implicit relation reasoning (masked language modelling).

Vocabulary layout (ids), as in CLIP plus one token::

    0 .. 255                   the 256 byte characters (id 0 is '!')
    256 .. 511                 the same characters followed by '</w>'
    512 .. 512+M-1             one token per merge (M merges), in merge order
    512+M, 512+M+1             <|startoftext|> (sot), <|endoftext|> (eot)
    512+M+2                    <|mask|> (ours; not in CLIP)

With CLIP's 48,894 merges: sot 49406, eot 49407, mask 49408, ``vocab_size`` 49409. Padding uses id 0,
as in CLIP and IRRA, even though id 0 is also the real token '!' (see :func:`mask_tokens`).
"""

from __future__ import annotations

import functools
import gzip
import html
import io
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

from xmr.atomic import atomic_write_bytes
from xmr.errors import ConfigError, DataError

__all__ = [
    "CLIP_NUM_MERGES",
    "EOT_TOKEN",
    "MASK_TOKEN",
    "SOT_TOKEN",
    "ClipTokenizer",
    "bytes_to_unicode",
    "clean_text",
    "mask_tokens",
    "pretokenize",
]

CLIP_NUM_MERGES = 49152 - 256 - 2  # 48,894: the merges CLIP reads from bpe_simple_vocab_16e6.txt.gz
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"

_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_CACHE_LIMIT = 500_000  # words; the per-word BPE cache is cleared past this to bound memory


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 map from each byte to a printable unicode character (so BPE never sees spaces or
    control characters). Printable Latin-1 bytes map to themselves; the others to chr(256 + n)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy, HTML unescape (twice, for doubly escaped text), collapse whitespace,
    strip, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def pretokenize(text: str) -> list[str]:
    """Clean ``text`` and split it into byte-mapped words (without ``</w>``), as CLIP does before BPE.

    Literal ``<|startoftext|>`` / ``<|endoftext|>`` in the text come out as words of their own (CLIP
    maps them to the special ids; so do we, for parity)."""
    table = _byte_table()
    # latin-1 turns each UTF-8 byte b into chr(b); translate then applies the byte map in C.
    return [
        piece.encode("utf-8").decode("latin-1").translate(table)
        for piece in _PRETOKENIZE.findall(clean_text(text))
    ]


@functools.lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    return dict(bytes_to_unicode().items())


def _base_vocab() -> list[str]:
    chars = list(bytes_to_unicode().values())
    return chars + [c + END_OF_WORD for c in chars]


def _read_text(path: Path) -> str:
    """Read a merges file, gzip-compressed or plain UTF-8; DataError naming it on any failure."""
    if not path.is_file():
        raise DataError(f"BPE merges file not found: {path}")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read BPE merges file {path}: {exc}") from exc


def _parse_merges(text: str, source: str) -> list[tuple[str, str]]:
    """Parse merge lines ``"a b"``; a first line containing ``#version`` is a header (CLIP and HF both
    write one). Blank lines are ignored."""
    lines = text.split("\n")
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{source}: line {number}: expected two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _load_merges_file(path: str | os.PathLike[str]) -> tuple[Path, list[tuple[str, str]]]:
    path = Path(path)
    merges = _parse_merges(_read_text(path), str(path))
    if not merges:
        raise DataError(f"BPE merges file {path} holds no merges")
    return path, merges


class ClipTokenizer:
    """CLIP byte-level BPE tokenizer with an added ``<|mask|>`` token.

    Build it with :meth:`from_bpe_file` (CLIP's ``bpe_simple_vocab_16e6.txt.gz``), :meth:`from_hf_dir`
    (a Hugging Face ``vocab.json`` + ``merges.txt`` directory) or :meth:`from_merges` (e.g. merges from
    :func:`xmr.text.bpe_train.train_bpe`). Calling it returns padded ``(B, context_length)`` id tensors.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], *, source: str = "merges") -> None:
        self._merges = [(str(a), str(b)) for a, b in merges]
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(self._merges):
            self._ranks.setdefault(pair, rank)  # a repeated merge can never fire again: first rank wins
        self._tokens = self._build_vocab(self._merges, source)
        self._ids = {token: i for i, token in enumerate(self._tokens)}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[str, tuple[int, ...]] = {
            SOT_TOKEN: (self.sot_id,),
            EOT_TOKEN: (self.eot_id,),
        }

    @staticmethod
    def _build_vocab(merges: Sequence[tuple[str, str]], source: str) -> list[str]:
        """Bytes, bytes + ``</w>``, merged symbols, sot, eot, mask. A merge must join two symbols that
        already exist; a merged symbol produced twice keeps its first id (no gaps in the ids)."""
        tokens = _base_vocab()
        known = set(tokens)
        for rank, (left, right) in enumerate(merges):
            if left not in known or right not in known:
                raise DataError(
                    f"{source}: merge {rank} ({left!r}, {right!r}) joins a symbol no earlier merge produced"
                )
            joined = left + right
            if joined not in known:
                known.add(joined)
                tokens.append(joined)
        return tokens + [SOT_TOKEN, EOT_TOKEN, MASK_TOKEN]

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike[str], max_merges: int | None = None) -> ClipTokenizer:
        """Load a CLIP-format merges file (gzip or plain text, first line a header).

        ``max_merges=None`` reads CLIP's 48,894 merges (``lines[1:49152-256-2+1]``, as CLIP does), or
        every merge when the file holds fewer (e.g. one written by :meth:`save`)."""
        if max_merges is not None and max_merges < 0:
            raise ConfigError(f"max_merges must be >= 0, got {max_merges}")
        path, merges = _load_merges_file(path)
        limit = CLIP_NUM_MERGES if max_merges is None else max_merges
        return cls(merges[:limit], source=str(path))

    @classmethod
    def from_merges(cls, merges: Sequence[tuple[str, str]]) -> ClipTokenizer:
        """Build from an in-memory list of merges, e.g. from ``train_bpe``."""
        return cls(merges, source="merges argument")

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> ClipTokenizer:
        """Build from a Hugging Face CLIP tokenizer directory (``vocab.json`` + ``merges.txt``),
        checking that every id in ``vocab.json`` equals the id our layout gives that token."""
        directory = Path(path)
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        for required in (vocab_path, merges_path):
            if not required.is_file():
                raise DataError(f"Hugging Face tokenizer file not found: {required}")
        _, merges = _load_merges_file(merges_path)
        tokenizer = cls(merges, source=str(merges_path))
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {vocab_path}: {exc}") from exc
        if not isinstance(vocab, dict):
            raise DataError(f"{vocab_path}: expected a JSON object mapping tokens to ids")
        for token, token_id in vocab.items():
            ours = tokenizer._ids.get(token)
            if ours != token_id:
                raise DataError(
                    f"{vocab_path}: token {token!r} has id {token_id}, but {merges_path.name} gives "
                    f"{ours}; the two files do not belong together"
                )
        return tokenizer

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the merges as a gzip CLIP-format file (header line + one merge per line), atomically
        and byte-for-byte reproducibly (gzip mtime 0). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in self._merges)]) + "\n"
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz:
            gz.write(body.encode("utf-8"))
        return atomic_write_bytes(path, buffer.getvalue())

    # ------------------------------------------------------------------ properties
    @property
    def sot_id(self) -> int:
        return len(self._tokens) - 3

    @property
    def eot_id(self) -> int:
        return len(self._tokens) - 2

    @property
    def mask_id(self) -> int:
        return len(self._tokens) - 1

    @property
    def pad_id(self) -> int:
        """Padding id (0, as in CLIP; also the real token '!')."""
        return 0

    @property
    def vocab_size(self) -> int:
        """Number of ids, ``<|mask|>`` included (49,409 for CLIP's vocabulary)."""
        return len(self._tokens)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """(sot, eot, mask): ids that never carry caption content. Padding (0) is not listed."""
        return (self.sot_id, self.eot_id, self.mask_id)

    @property
    def merges(self) -> list[tuple[str, str]]:
        return list(self._merges)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def __repr__(self) -> str:
        return f"ClipTokenizer(merges={len(self._merges)}, vocab_size={self.vocab_size})"

    # -------------------------------------------------------------------- encoding
    def _bpe(self, word: str) -> list[str]:
        """Apply merges to one byte-mapped word: repeatedly merge, left to right, every occurrence of the
        lowest-ranked adjacent pair (CLIP's algorithm)."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, len(self._merges)
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(pair)
                if rank is not None and rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            symbols = _merge_pair(symbols, best)
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self._ids[s] for s in self._bpe(word))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {SOT_TOKEN: (self.sot_id,), EOT_TOKEN: (self.eot_id,)}
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without sot/eot (a literal ``<|endoftext|>`` in the text still maps to
        the eot id, as in CLIP)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for word in pretokenize(text):
            ids.extend(self._word_ids(word))
        return ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True
    ) -> torch.Tensor:
        """``[sot] + tokens + [eot]`` per text, zero padded to ``(B, context_length)`` (long).

        Too-long texts are cut and eot kept as the last token (IRRA style); ``truncate=False`` raises
        ConfigError instead. A single string gives a batch of one."""
        if context_length < 2:
            raise ConfigError(f"context_length must be >= 2 (room for sot and eot), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ConfigError(
                        f"text {row} has {len(ids)} tokens with sot/eot, more than context_length="
                        f"{context_length}; shorten it or pass truncate=True"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of one id sequence. Ids after the first eot are padding and dropped; with
        ``skip_special`` sot/eot/mask are dropped too. Word ends become spaces; invalid UTF-8 is
        replaced. Cleaning is lossy, so this inverts :meth:`encode` only on clean lower-case text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id) + 1]
        specials = set(self.special_ids)
        pieces: list[bytes] = []
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
            if token_id in specials:
                if not skip_special:
                    pieces.append(self._tokens[token_id].encode("utf-8") + b" ")
                continue
            token = self._tokens[token_id]
            word_end = token.endswith(END_OF_WORD)
            chars = token[: -len(END_OF_WORD)] if word_end else token
            pieces.append(bytes(self._byte_decoder[c] for c in chars) + (b" " if word_end else b""))
        return b"".join(pieces).decode("utf-8", errors="replace").strip()


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair``, scanning left to right."""
    first, second = pair
    merged: list[str] = []
    i, n = 0, len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _random_regular_tokens(
    excluded: torch.Tensor,
    vocab_size: int,
    ids: torch.Tensor,
    generator: torch.Generator | None,
    draw_device: torch.device,
) -> torch.Tensor:
    """A tensor shaped like ``ids`` of ids drawn uniformly from ``[0, vocab_size)`` minus ``excluded``."""
    regular = torch.ones(vocab_size, dtype=torch.bool, device=ids.device)
    regular[excluded[excluded < vocab_size]] = False
    regular_ids = regular.nonzero().squeeze(1)
    if len(regular_ids) == 0:
        raise ConfigError(f"vocab_size={vocab_size} leaves no regular token to draw random replacements from")
    pick = torch.randint(len(regular_ids), ids.shape, generator=generator, device=draw_device)
    return regular_ids[pick.to(ids.device)]


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    pad_id: int = 0,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking for IRRA's MLM objective; returns ``(masked_ids, labels)``, both ``(B, L)``.

    Real tokens are those that are neither ``pad_id`` nor in ``special_ids`` nor ``mask_id``. Each is
    selected with probability ``prob``; a row with real tokens but no selection gets one real token
    chosen uniformly. Of the selected: 80% become ``mask_id``, 10% a token drawn uniformly from the
    regular vocabulary (ids in ``[0, vocab_size)`` that are neither special nor mask; ``[0, sot_id)`` for
    the CLIP layout, id 0 included), 10% stay unchanged. ``labels`` holds the original id at selected
    positions and 0 elsewhere (0 = ignore).

    Quirk kept from the reference code: id 0 is both padding and the real token '!' in CLIP's
    vocabulary. A '!' is therefore never selected (it counts as padding), which matches the convention
    that label 0 is ignored: a selected '!' could not be learnt from anyway.

    All random numbers are drawn as whole tensors (same count whatever the data), so a generator with
    the same seed reproduces the result exactly.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
    if not 0.0 < prob <= 1.0:
        raise ConfigError(f"mask probability must be in (0, 1], got {prob}")
    draw_device = generator.device if generator is not None else ids.device
    shape = ids.shape

    def uniform() -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=draw_device).to(ids.device)

    u_select, u_action, u_fallback = uniform(), uniform(), uniform()
    excluded = torch.tensor(sorted({*map(int, special_ids), int(mask_id)}), device=ids.device)
    real = (ids != pad_id) & ~torch.isin(ids, excluded)

    selected = real & (u_select < prob)
    # Guarantee one selection per row with real tokens: the real position with the largest draw.
    needs_one = real.any(dim=1) & ~selected.any(dim=1)
    fallback = u_fallback.masked_fill(~real, -1.0).argmax(dim=1, keepdim=True)
    forced = torch.zeros_like(selected).scatter_(1, fallback, True) & needs_one[:, None]
    selected |= forced

    random_tokens = _random_regular_tokens(excluded, vocab_size, ids, generator, draw_device)
    to_mask = selected & (u_action < 0.8)
    to_random = selected & (u_action >= 0.8) & (u_action < 0.9)
    masked = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    masked = torch.where(to_random, random_tokens, masked)
    labels = torch.where(selected, ids, torch.zeros_like(ids))
    return masked, labels
