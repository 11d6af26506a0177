"""Streaming the gallery (.npy files, memory maps, chunk iterables): same numbers, bounded reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmr.evaluation import Positives, positive_ranks, rank_metrics, retrieval_metrics, topk_bounded
from xmr.evaluation.streaming import ChunkedFeatures, NpyFeatures


def oracle_ranks(scores: np.ndarray, positives: list[set[int]]) -> list[list[int]]:
    """Plain definition: 1-based positions of the correct items in a stable descending sort."""
    out = []
    for row, correct in zip(scores, positives):
        order = np.argsort(-row, kind="stable")  # ties: lower gallery index first
        out.append((np.flatnonzero([int(g) in correct for g in order]) + 1).tolist())
    return out


def tied_case(seed: int, q: int = 45, g: int = 310, d: int = 6):
    """Features on a 1/4 grid (exact products, many ties); several correct items per query."""
    rng = np.random.default_rng(seed)
    queries = (rng.integers(-2, 3, (q, d)) / 4.0).astype(np.float32)
    gallery = (rng.integers(-2, 3, (g, d)) / 4.0).astype(np.float32)
    lists = [sorted(rng.choice(g, size=int(rng.integers(1, 7)), replace=False).tolist()) for _ in range(q)]
    lists[2] = []  # a query without any correct item
    return queries, gallery, lists


class RecordingRows:
    """A slice-indexable gallery that records how many rows each read asks for."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index):
        rows = self.array[index]
        self.reads.append(len(rows))
        return rows


def check_ranks(ranks: torch.Tensor, counts: torch.Tensor, expected: list[list[int]]) -> None:
    for i, want in enumerate(expected):
        assert int(counts[i]) == len(want)
        assert ranks[i, : len(want)].tolist() == want


@pytest.mark.parametrize("seed,query_chunk,gallery_chunk", [(0, 7, 13), (1, 1, 64), (2, 45, 1), (3, 16, 309)])
def test_streaming_sources_equal_in_memory_and_oracle(tmp_path, seed, query_chunk, gallery_chunk):
    queries, gallery, lists = tied_case(seed)
    expected = oracle_ranks(queries @ gallery.T, [set(items) for items in lists])
    path = tmp_path / "gallery.npy"
    np.save(path, gallery)
    positives = Positives.from_lists(lists, len(gallery))
    sources = {
        "tensor": torch.from_numpy(gallery),
        "npy path": path,
        "mmap": np.load(path, mmap_mode="r"),
        "chunks": ChunkedFeatures(lambda: (gallery[i : i + 37] for i in range(0, len(gallery), 37)),
                                  len(gallery), gallery.shape[1]),
        "list": [gallery[:100], torch.from_numpy(gallery[100:101]), gallery[101:]],
    }
    args = {"normalize": False, "query_chunk": query_chunk, "gallery_chunk": gallery_chunk}
    results = {}
    for name, source in sources.items():
        ranks, counts = positive_ranks(queries, source, positives, **args)
        check_ranks(ranks, counts, expected)
        results[name] = rank_metrics(queries, source, positives, **args)
    assert all(result == results["tensor"] for result in results.values())


def test_streaming_bf16_generic_floats_equal_in_memory(tmp_path):
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((70, 24)).astype(np.float32)
    gallery = rng.standard_normal((500, 24)).astype(np.float32)
    ql, gl = rng.integers(0, 25, 70), rng.integers(0, 25, 500)
    np.save(tmp_path / "g.npy", gallery)
    args = {"query_chunk": 16, "gallery_chunk": 96, "compute_dtype": torch.bfloat16}
    in_memory = retrieval_metrics(torch.from_numpy(queries), torch.from_numpy(gallery), ql, gl, **args)
    streamed = retrieval_metrics(queries, str(tmp_path / "g.npy"), ql, gl, **args)
    assert streamed == in_memory
    assert 0 < in_memory["mAP"] < 100


def test_gallery_is_read_in_bounded_chunks():
    queries, gallery, lists = tied_case(7, g=400)
    recorder = RecordingRows(gallery)
    positives = Positives.from_lists(lists, len(gallery))
    ranks, counts = positive_ranks(queries, recorder, positives, normalize=False, query_chunk=8, gallery_chunk=32)
    check_ranks(ranks, counts, oracle_ranks(queries @ gallery.T, [set(items) for items in lists]))
    union = len(set().union(*lists))
    slices = [n for n in recorder.reads if n != union]
    assert max(slices) <= 32  # block reads never exceed gallery_chunk rows
    assert sum(slices) == len(gallery)  # one pass over the gallery
    assert recorder.reads.count(union) >= 1  # plus one read of the correct items' rows


def test_npy_file_is_read_with_bounded_file_reads(tmp_path):
    queries, gallery, lists = tied_case(8, g=300)
    np.save(tmp_path / "g.npy", gallery)
    source = NpyFeatures(tmp_path / "g.npy")
    positives = Positives.from_lists(lists, len(gallery))
    ranks, counts = positive_ranks(queries, source, positives, normalize=False, query_chunk=10, gallery_chunk=50)
    check_ranks(ranks, counts, oracle_ranks(queries @ gallery.T, [set(items) for items in lists]))
    assert source.reads and max(source.reads) <= 50
    assert np.array_equal(source[10:20], gallery[10:20])
    assert np.array_equal(source[np.array([3, 4, 9])], gallery[[3, 4, 9]])


def test_chunked_features_read_twice_in_given_chunks():
    queries, gallery, lists = tied_case(9, g=200)
    seen = []

    def chunks():
        for start in range(0, len(gallery), 30):
            seen.append(min(30, len(gallery) - start))
            yield gallery[start : start + 30]

    positives = Positives.from_lists(lists, len(gallery))
    ranks, counts = positive_ranks(queries, ChunkedFeatures(chunks, len(gallery), 6), positives,
                                   normalize=False, query_chunk=9, gallery_chunk=64)
    check_ranks(ranks, counts, oracle_ranks(queries @ gallery.T, [set(items) for items in lists]))
    assert max(seen) == 30 and sum(seen) == 2 * len(gallery)  # two passes, never the whole matrix


def test_one_shot_iterator_and_wrong_sizes_are_refused(tmp_path):
    queries, gallery, lists = tied_case(10, g=60)
    positives = Positives.from_lists(lists, len(gallery))
    with pytest.raises(TypeError, match="one-shot"):
        rank_metrics(queries, iter([gallery]), positives)
    short = ChunkedFeatures(lambda: [gallery[:50]], len(gallery), 6)
    with pytest.raises(ValueError, match="rows"):
        rank_metrics(queries, short, positives, gallery_chunk=16)
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        NpyFeatures(tmp_path / "bad.npy")


def test_thread_count_does_not_change_results():
    rng = np.random.default_rng(11)
    queries = torch.from_numpy(rng.standard_normal((300, 16)).astype(np.float32))
    gallery = torch.from_numpy(rng.standard_normal((3000, 16)).astype(np.float32))
    ql, gl = rng.integers(0, 200, 300), rng.integers(0, 200, 3000)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = retrieval_metrics(queries, gallery, ql, gl, query_chunk=32, gallery_chunk=256)
        torch.set_num_threads(2)
        two = retrieval_metrics(queries, gallery, ql, gl, query_chunk=32, gallery_chunk=256)
        assert torch.get_num_threads() == 2  # restored after the single-threaded workers
    finally:
        torch.set_num_threads(previous)
    assert one == two


def test_topk_bounded_streams_a_npy_file(tmp_path):
    queries, gallery, _ = tied_case(12)
    np.save(tmp_path / "g.npy", gallery)
    scores, indices = topk_bounded(queries, tmp_path / "g.npy", 9, 8, 40, normalize=False)
    stable = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :9]
    assert np.array_equal(scores.numpy(), np.take_along_axis(queries @ gallery.T, stable, 1))
    assert indices.tolist() == stable.tolist()
