"""Tests for xmr.text.tokenizer (CLIP BPE, padding, MLM masking) and xmr.text.bpe_train."""

from __future__ import annotations

import gzip
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from xmr.errors import ConfigError, DataError
from xmr.text.bpe_train import train_bpe
from xmr.text.tokenizer import ClipTokenizer, clean_text, mask_tokens

# CLIP's vocabulary lives beside the repo (../shared); it is never copied into the repository.
_DEFAULT_BPE = Path(__file__).resolve().parents[2] / "shared/data/bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE = Path(os.environ.get("XMR_CLIP_BPE") or _DEFAULT_BPE)
needs_clip_bpe = pytest.mark.skipif(
    not CLIP_BPE.is_file(),
    reason=f"CLIP BPE vocabulary not found at {CLIP_BPE} (set XMR_CLIP_BPE to its path)",
)

# CLIP layout constants, used by the masking tests (which need no vocabulary file).
SOT, EOT, MASK, VOCAB = 49406, 49407, 49408, 49409


# --------------------------------------------------------------------------- sentence generator
COLORS = ["red", "blue", "black", "white", "green", "yellow", "grey", "pink", "dark-blue", "light"]
ITEMS = ["shirt", "jacket", "coat", "pants", "jeans", "shorts", "skirt", "dress", "sneakers", "backpack"]
SUBJECTS = ["A woman", "The man", "This girl", "An older gentleman", "A young lady", "the pedestrian"]
VERBS = ["is wearing", "wears", "has on", "is dressed in", "carries", "walks with"]

FRAGMENTS: dict[str, list[str]] = {
    "punctuation": [
        "!!",
        "...",
        "?!",
        "--",
        "(left)",
        "[x]",
        "{y}",
        '"quoted"',
        "a/b",
        "50%",
        "@home",
        "e-mail",
        "#tag",
        "***",
        ";",
        ":)",
        "~~",
        "<|mask|>",
        "</w>",
        "<b>",
        "a,b.c",
        "'",
    ],
    "numbers": ["3.14", "1990s", "24/7", "12kg", "No.5", "2nd", "007", "1,000,000", "-42", "3x4"],
    "apostrophes": [
        "she's",
        "they're",
        "don't",
        "we've",
        "I'm",
        "you'll",
        "he'd",
        "O'Neil",
        "the man's",
        "'quoted'",
        "rock'n'roll",
        "IT'S",
        "'S",
        "isn't",
        "ma'am",
        "'tis",
    ],
    "accents": [
        "café",
        "naïve",
        "Ångström",
        "jalapeño",
        "façade",
        "Zoë",
        "über",
        "Ærø",
        "crème brûlée",
        "São Paulo",
        "Łódź",
        "İstanbul",
        "cafe\u0301",
        "Dvořák",
        "smørrebrød",
    ],
    "cjk": ["穿着红色外套的女人", "日本語のテキスト", "한국어 문장", "背着黑色背包", "カタカナ", "中文123"],
    "emoji": ["👩\u200d🦰", "👍🏽", "🎒", "❤️", "😀😀", "🇯🇵", "✨bag✨"],
    "upper": ["A MAN IN BLACK", "McDonald's", "NASA", "ÉCOLE", "STRASSE", "WeArInG", "ẞ"],
    "special_literals": ["<|endoftext|>", "<|startoftext|>", "x<|endoftext|>y"],
}
# Categories where transformers' CLIPTokenizer deliberately differs from original CLIP: its normaliser is
# NFC + whitespace + per-character lower-case, without ftfy.fix_text, html.unescape or Python's
# context-sensitive lower() (final sigma). Ours follows CLIP; see test_cleaning_sensitive_categories.
SENSITIVE: dict[str, list[str]] = {
    "html": ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "fish &amp;amp; chips", "&eacute;", "&nbsp;"],
    "ftfy": [
        "don\u2019t",
        "\u201cquoted\u201d",
        "\ufb01ne",
        "ＡＢＣ１２３",
        "cafÃ©",
        "x\x07y",
        "a\x85b",
        "\u2018single\u2019",
    ],
    "greek_upper": ["ΟΔΟΣ", "ΣΟΦΟΣ ΆΝΘΡΩΠΟΣ"],
}
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000", "\r\n", ", "]


def _fragment(rng: random.Random, category: str) -> str:
    if category == "pedestrian":
        return (
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} a {rng.choice(COLORS)} {rng.choice(ITEMS)} "
            f"and {rng.choice(COLORS)} {rng.choice(ITEMS)}"
        )
    if category == "long_words":
        length = rng.randint(20, 80)
        return rng.choice(
            [
                "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(length)),
                "a" * length,
                "-".join(rng.choice(ITEMS) for _ in range(6)),
                "pneumonoultramicroscopicsilicovolcanoconiosis",
            ]
        )
    pool = FRAGMENTS.get(category) or SENSITIVE[category]
    return rng.choice(pool)


def _sentences(n: int, categories: list[str], forced: list[str] | None = None, seed: int = 0) -> list[str]:
    """Deterministic sentences of 1-4 fragments (each from a random category, pedestrian captions
    twice as likely), joined by varied whitespace; ``forced`` adds one fragment from those categories."""
    rng = random.Random(seed)
    weighted = categories + ["pedestrian"]
    out = []
    for _ in range(n):
        cats = [rng.choice(weighted) for _ in range(rng.randint(1, 4))]
        if forced:
            cats.insert(rng.randrange(len(cats) + 1), rng.choice(forced))
        text = ""
        for cat in cats:
            text += _fragment(rng, cat) + rng.choice(SEPARATORS)
        out.append(rng.choice(["", " ", "\n"]) + text)
    return out


AGREEING = ["pedestrian", "long_words", *FRAGMENTS]
RAW_SENTENCES = _sentences(1200, AGREEING, seed=1)
SENSITIVE_SENTENCES = _sentences(300, AGREEING, forced=list(SENSITIVE), seed=2)


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_tok() -> ClipTokenizer:
    if not CLIP_BPE.is_file():
        pytest.skip(f"CLIP BPE vocabulary not found at {CLIP_BPE} (set XMR_CLIP_BPE to its path)")
    return ClipTokenizer.from_bpe_file(CLIP_BPE)


def _write_hf_dir(tok: ClipTokenizer, directory: Path) -> Path:
    """HF layout: vocab.json (our vocabulary without <|mask|>, like released CLIP dirs) + merges.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size - 1)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in tok.merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def hf_dir(clip_tok: ClipTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_hf_dir(clip_tok, tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def hf_tok(hf_dir: Path):
    transformers = pytest.importorskip("transformers")
    # transformers 5.x only has the tokenizers-backed CLIPTokenizer (no slow Python class).
    return transformers.CLIPTokenizer.from_pretrained(str(hf_dir))


def _hf_ids(hf_tok, texts: list[str]) -> list[list[int]]:
    return hf_tok(texts, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ CLIP parity
@needs_clip_bpe
def test_special_ids_and_layout(clip_tok: ClipTokenizer) -> None:
    assert (clip_tok.sot_id, clip_tok.eot_id, clip_tok.mask_id) == (49406, 49407, 49408)
    assert clip_tok.vocab_size == 49409 and clip_tok.pad_id == 0
    assert clip_tok.special_ids == (49406, 49407, 49408)
    assert clip_tok.id_to_token(0) == "!" and clip_tok.id_to_token(256) == "!</w>"
    assert clip_tok.id_to_token(512) == "in" and len(clip_tok.merges) == 48894
    assert clip_tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


@needs_clip_bpe
def test_parity_with_transformers_raw_text(clip_tok: ClipTokenizer, hf_tok) -> None:
    assert len(RAW_SENTENCES) >= 1000
    expected = _hf_ids(hf_tok, RAW_SENTENCES)
    mismatches = [
        (s, clip_tok.encode(s), e) for s, e in zip(RAW_SENTENCES, expected) if clip_tok.encode(s) != e
    ]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


@needs_clip_bpe
def test_parity_on_cleaned_text_all_categories(clip_tok: ClipTokenizer, hf_tok) -> None:
    """BPE, regex and byte map agree on every category once CLIP's cleaning is applied first."""
    sentences = RAW_SENTENCES + SENSITIVE_SENTENCES
    expected = _hf_ids(hf_tok, [clean_text(s) for s in sentences])
    mismatches = [s for s, e in zip(sentences, expected) if clip_tok.encode(s) != e]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


@needs_clip_bpe
def test_cleaning_sensitive_categories(clip_tok: ClipTokenizer, hf_tok) -> None:
    """Excluded from raw parity because transformers deviates from original CLIP here; we follow CLIP."""
    enc = clip_tok.encode
    assert enc("fish &amp;amp; chips") == enc("fish & chips")  # html.unescape twice
    assert enc("don\u2019t") == enc("don't") == [847, 713]  # ftfy uncurls quotes before the regex
    assert enc("\ufb01ne ＡＢＣ") == enc("fine abc")  # ftfy: ligatures, full width
    assert enc("cafÃ©") == enc("café")  # ftfy: mojibake
    assert enc("ΟΔΟΣ") == enc("οδος")  # Python lower(): final sigma
    differing = sum(
        clip_tok.encode(s) != e for s, e in zip(SENSITIVE_SENTENCES, _hf_ids(hf_tok, SENSITIVE_SENTENCES))
    )
    assert differing > 100  # the exclusion is real, not a leftover


@needs_clip_bpe
def test_from_hf_dir_matches_bpe_file(clip_tok: ClipTokenizer, hf_dir: Path) -> None:
    from_hf = ClipTokenizer.from_hf_dir(hf_dir)
    assert from_hf.merges == clip_tok.merges and from_hf.vocab_size == clip_tok.vocab_size
    sample = RAW_SENTENCES[:200] + SENSITIVE_SENTENCES[:50]
    assert [from_hf.encode(s) for s in sample] == [clip_tok.encode(s) for s in sample]
    assert torch.equal(from_hf(sample), clip_tok(sample))


@needs_clip_bpe
def test_from_hf_dir_rejects_mismatched_vocab(clip_tok: ClipTokenizer, hf_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab["in"], vocab["th"] = vocab["th"], vocab["in"]
    (bad / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (bad / "merges.txt").write_bytes((hf_dir / "merges.txt").read_bytes())
    with pytest.raises(DataError, match="vocab.json"):
        ClipTokenizer.from_hf_dir(bad)
    (bad / "merges.txt").unlink()
    with pytest.raises(DataError, match="merges.txt"):
        ClipTokenizer.from_hf_dir(bad)


@needs_clip_bpe
def test_max_merges_and_save_round_trip(clip_tok: ClipTokenizer, tmp_path: Path) -> None:
    small = ClipTokenizer.from_bpe_file(CLIP_BPE, max_merges=1000)
    assert small.vocab_size == 512 + 1000 + 3 and small.sot_id == 1512
    saved = ClipTokenizer.from_bpe_file(clip_tok.save(tmp_path / "bpe.txt.gz"))
    assert saved.merges == clip_tok.merges
    assert saved.encode(RAW_SENTENCES[0]) == clip_tok.encode(RAW_SENTENCES[0])


# ------------------------------------------------------------------- padding, truncation, decode
@needs_clip_bpe
def test_call_pads_and_truncates_keeping_eot_last(clip_tok: ClipTokenizer) -> None:
    long_text = " ".join(["a woman in a red coat"] * 30)
    short = "a man with a backpack"
    out = clip_tok([long_text, short])
    assert out.shape == (2, 77) and out.dtype == torch.long
    tokens = clip_tok.encode(long_text)
    assert out[0, 0] == 49406 and out[0, -1] == 49407 and out[0, 1:76].tolist() == tokens[:75]
    n = len(clip_tok.encode(short))
    assert out[1, : n + 2].tolist() == [49406, *clip_tok.encode(short), 49407]
    assert (out[1, n + 2 :] == 0).all()
    assert clip_tok(short, context_length=10).shape == (1, 10)
    with pytest.raises(ConfigError, match="context_length"):
        clip_tok(long_text, truncate=False)
    assert clip_tok(short, truncate=False).shape == (1, 77)


@needs_clip_bpe
def test_decode_round_trip(clip_tok: ClipTokenizer) -> None:
    text = "a young woman in a long white dress is walking with a black backpack and pink sneakers"
    assert clip_tok.decode(clip_tok(text)[0]) == text
    assert clip_tok.decode(clip_tok.encode(text)) == text
    masked = clip_tok(text)[0].clone()
    masked[2] = clip_tok.mask_id
    assert "<|mask|>" in clip_tok.decode(masked, skip_special=False)
    assert "<|mask|>" not in clip_tok.decode(masked)
    assert clip_tok.decode(clip_tok.encode("über 日本 😀")) == "über 日本 😀"


def test_bad_merges_files_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.gz"):
        ClipTokenizer.from_bpe_file(tmp_path / "missing.gz")
    malformed = tmp_path / "malformed.txt.gz"
    malformed.write_bytes(gzip.compress(b"#version: 0.2\ni n\nthree parts here\n"))
    with pytest.raises(DataError, match="malformed.txt.gz.*line 3"):
        ClipTokenizer.from_bpe_file(malformed)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(b"#version: 0.2\ni n\n" * 50)[:30])
    with pytest.raises(DataError, match="truncated.gz"):
        ClipTokenizer.from_bpe_file(truncated)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("#version: 0.2\nin g\n", encoding="utf-8")  # 'in' was never produced
    with pytest.raises(DataError, match="unknown.txt"):
        ClipTokenizer.from_bpe_file(unknown)


# ------------------------------------------------------------------------------------- masking
def _caption_batch(rows: int, seed: int = 0, min_len: int = 3, max_len: int = 75) -> torch.Tensor:
    """CLIP-layout batch: sot, real ids in [1, sot), eot, zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, 77, dtype=torch.long)
    lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g)
    for r, n in enumerate(lengths.tolist()):
        ids[r, 0] = SOT
        ids[r, 1 : n + 1] = torch.randint(1, SOT, (n,), generator=g)
        ids[r, n + 1] = EOT
    return ids


def _mask(ids: torch.Tensor, seed: int, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(
        ids, mask_id=MASK, vocab_size=VOCAB, special_ids=(SOT, EOT, MASK), prob=prob, generator=g
    )


def test_mask_tokens_statistics() -> None:
    ids = _caption_batch(3000, min_len=3, max_len=60)
    masked, labels = _mask(ids, seed=1)
    real = (ids != 0) & (ids != SOT) & (ids != EOT)
    selected = labels != 0
    n_real = real.sum(1).double()
    expected = (0.15 * n_real + 0.85**n_real).sum() / n_real.sum()  # p=0.15 plus the forced one per row
    rate = selected.sum() / real.sum()
    assert abs(rate - expected) < 0.005, (rate, expected)
    n_sel = selected.sum().item()
    frac_mask = (masked[selected] == MASK).sum().item() / n_sel
    frac_same = (masked[selected] == ids[selected]).sum().item() / n_sel
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_same - 0.1) < 0.01 and abs(frac_random - 0.1) < 0.01
    replaced = masked[selected & (masked != MASK)]
    assert replaced.min() >= 0 and replaced.max() < SOT  # regular vocabulary only


def test_mask_tokens_invariants() -> None:
    ids = _caption_batch(500, seed=3)
    masked, labels = _mask(ids, seed=4)
    real = (ids != 0) & (ids != SOT) & (ids != EOT)
    selected = labels != 0
    assert not (selected & ~real).any()  # sot, eot, padding never selected
    assert torch.equal(masked[~real], ids[~real])
    assert not ((masked != ids) & ~selected).any()
    assert torch.equal(labels[selected], ids[selected]) and (labels[~selected] == 0).all()
    assert selected.any(dim=1).all()  # at least one per row


def test_mask_tokens_forced_selection_and_edge_rows() -> None:
    ids = _caption_batch(4000, seed=5, min_len=5, max_len=5)
    masked, labels = _mask(ids, seed=6, prob=1e-9)  # no natural selection: every row uses the fallback
    selected = labels != 0
    assert (selected.sum(1) == 1).all()
    per_position = selected[:, 1:6].sum(0).double()
    assert ((per_position - 800).abs() < 120).all(), per_position  # uniform over the 5 real tokens
    assert abs((masked[selected] == MASK).double().mean().item() - 0.8) < 0.03  # same 80/10/10 rule
    edge = torch.tensor([[SOT, EOT, 0, 0], [SOT, 0, 7, EOT], [SOT, MASK, 9, EOT]])
    for seed in range(20):
        m, lab = _mask(edge, seed=seed)
        assert (lab[0] == 0).all() and torch.equal(m[0], edge[0])  # no real token: untouched
        assert lab[1].tolist() == [0, 0, 7, 0] and lab[2].tolist() == [0, 0, 9, 0]  # '!'/mask never picked


def test_mask_tokens_deterministic_and_validated() -> None:
    ids = _caption_batch(200, seed=7)
    a, b = _mask(ids, seed=11), _mask(ids, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], _mask(ids, seed=12)[1])
    with pytest.raises(ConfigError, match="probability"):
        _mask(ids, seed=0, prob=1.5)


# ------------------------------------------------------------------------------------ bpe_train
HAND_CORPUS = ["low low low low low", "lower lower", "newest newest newest", "widest"]
HAND_MERGES = [
    ("l", "o"),  # 7 = low x5 + lower x2
    ("lo", "w</w>"),  # 5, ties with ('w', 'e') = 5: 'lo' < 'w'
    ("w", "e"),  # 5 = lower x2 + newest x3
    ("s", "t</w>"),  # 4 = newest x3 + widest
    ("e", "we"),  # 3, ties with ('n','e') and ('we','s'): smallest first
    ("ewe", "st</w>"),
    ("n", "ewest</w>"),
    ("lo", "we"),  # 2
    ("lowe", "r</w>"),  # 2; everything left occurs once < min_frequency
]


def test_train_bpe_hand_checked_merges() -> None:
    assert train_bpe(HAND_CORPUS, 100) == HAND_MERGES
    assert train_bpe(HAND_CORPUS, 3) == HAND_MERGES[:3]
    assert train_bpe(list(reversed(HAND_CORPUS)), 100) == HAND_MERGES  # order of texts is irrelevant
    assert train_bpe(HAND_CORPUS, 100, min_frequency=5) == HAND_MERGES[:3]
    assert train_bpe(HAND_CORPUS, 0) == []
    tok = ClipTokenizer.from_merges(HAND_MERGES)
    assert [tok.id_to_token(i) for i in tok.encode("Lower newest lowest")] == [
        "lower</w>",
        "newest</w>",
        "lowe",
        "st</w>",
    ]
    with pytest.raises(ConfigError):
        train_bpe(HAND_CORPUS, -1)


def _pedestrian_captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # Lower case, no punctuation: text that decode(encode(.)) reproduces exactly.
    return [
        _fragment(rng, "pedestrian").lower().replace("-", " ") + " " + rng.choice(["walking", "standing"])
        for _ in range(n)
    ]


def test_trained_tokenizer_round_trip_and_byte_fallback(tmp_path: Path) -> None:
    captions = _pedestrian_captions(400, seed=0)
    merges = train_bpe(captions, 300)
    assert merges == train_bpe(captions, 300)  # deterministic
    tok = ClipTokenizer.from_merges(merges)
    assert tok.vocab_size == 512 + len(merges) + 3  # no merged symbol repeats here
    for caption in captions[:50]:
        assert tok.decode(tok.encode(caption)) == caption
        assert len(tok.encode(caption)) <= len(caption.split()) * 2  # words mostly one token
    held_out = "Zoë wears a turquoise parka 😀 日本 xyzzy!"
    ids = tok.encode(held_out)
    assert ids and all(0 <= i < tok.sot_id for i in ids)
    assert tok.decode(ids) == "zoë wears a turquoise parka 😀 日本 xyzzy !"
    reloaded = ClipTokenizer.from_bpe_file(tok.save(tmp_path / "demo_bpe.txt.gz"))
    assert reloaded.merges == merges and reloaded.encode(held_out) == ids


def test_train_bpe_speed() -> None:
    rng = random.Random(0)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(3000)
    ]
    texts = [" ".join(rng.choice(words) for _ in range(15)) for _ in range(10_000)]
    start = time.perf_counter()
    merges = train_bpe(texts, 2000)
    assert len(merges) == 2000 and len(set(merges)) == 2000
    assert time.perf_counter() - start < 20.0  # ~1 s on 2 cores
