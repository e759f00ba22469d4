"""retrieval.py: every metric on hand-built cases, against a brute-force reference, against
pytorch-metric-learning and faiss; kNN; embedding extraction; the BLAS thread limit."""

import tracemalloc

from metrics_reference import reference_metrics
import numpy as np
import pytest
import torch

import extraction
import knn
import retrieval

# ============ helpers ============

# Unit vectors with entries +-1/2 in 4-d: inner products are exact multiples of 1/4, so every
# computation path (BLAS tiles, einsum, brute force) gives the same floats and ties are real.
CHAIN = (
    np.array([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [1, -1, -1, -1], [-1, -1, -1, -1]], dtype=np.float32) / 2
)  # CHAIN[i] . CHAIN[j] = 1 - |i - j| / 2


def exact_embeddings(n, dim=64, seed=0):
    """Random +-1/8 vectors in 64-d: exactly unit, inner products exact, many ties."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1, 1], dtype=np.float32), size=(n, dim)) / np.float32(np.sqrt(dim))


def sop_like_labels(n, num_categories=5, seed=0, shuffle=True):
    """Products of 2-12 images (SOP's range) spread over categories."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 13)))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 2:
        last = sizes.pop()
        sizes[-1] += last
    class_ids = np.repeat(np.arange(len(sizes)), sizes)
    super_ids = rng.integers(1, num_categories + 1, size=len(sizes))[class_ids]
    class_ids = class_ids * 7 + 3  # ids need not be 0..C-1
    if shuffle:
        perm = rng.permutation(n)
        class_ids, super_ids = class_ids[perm], super_ids[perm]
    return class_ids, super_ids


# The dense definition-by-definition reference lives at the top of retrieval.py; the tests hold
# the tiled engine (evaluate_embeddings, retrieval_details) against it.
brute_force = reference_metrics


def assert_metrics_equal(got, want, atol=1e-12):
    assert set(got) == {"product", "category", "num_queries"}
    assert got["num_queries"] == want["num_queries"]
    for protocol in ("product", "category"):
        assert set(got[protocol]) == set(want[protocol])
        for name, value in want[protocol].items():
            if name == "why" or value is None:
                assert got[protocol][name] == value, (protocol, name)
            else:
                assert got[protocol][name] == pytest.approx(value, abs=atol), (protocol, name)


# ============ hand-built cases ============


def test_spec_shape_and_keys():
    x = CHAIN[[0, 1, 1, 2, 3, 4]]
    m = retrieval.evaluate_embeddings(x, [0, 0, 1, 0, 1, 0], [1, 1, 1, 1, 2, 1])
    assert list(m) == ["product", "category", "num_queries"]
    assert list(m["product"]) == ["recall@1", "recall@10", "recall@100", "recall@1000", "map@r", "r_precision"]
    assert list(m["category"]) == [
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@20",
        "precision@1",
        "precision@5",
        "precision@10",
        "precision@20",
        "map@10",
    ]
    assert all(isinstance(v, float) and 0 <= v <= 1 for p in ("product", "category") for v in m[p].values())


def test_hand_built_product_and_category_protocols():
    # items: chain position (score = 1 - |i - j|/2), product, category
    #   0: c0 A 1 | 1: c1 A 1 | 2: c1 B 1 | 3: c2 A 1 | 4: c3 B 2 | 5: c4 A 1
    x = CHAIN[[0, 1, 1, 2, 3, 4]]
    class_ids = np.array([0, 0, 1, 0, 1, 0])
    super_ids = np.array([1, 1, 1, 1, 2, 1])
    d = retrieval.retrieval_details(x, class_ids, super_ids)
    # product protocol, by hand (ranking: score desc, then lower index):
    # q0: 1(.5,rel) 2(.5) 3(0,rel) 4 5(rel)  R=3 -> AP = (1/1 + 2/3)/3 = 5/9, RP 2/3, first 1
    # q1: 2(1) 0(.5,rel) 3(.5,rel) 4 5(rel)   -> AP = (1/2 + 2/3)/3 = 7/18, RP 2/3, first 2
    # q2: 1 0 3 4(rel) 5             R=1      -> AP 0, RP 0, first 4
    # q3: 1(.5,rel) 2(.5) 4(.5) 0(0,rel) 5(rel) -> AP = 1/3, RP 1/3, first 1
    # q4: 3 5 1 2(rel) 0             R=1      -> first 4
    # q5: 4 3(rel) 1(rel) 2 0(rel)            -> AP = (1/2 + 2/3)/3 = 7/18, RP 2/3, first 2
    np.testing.assert_allclose(d["ap_at_r"], [5 / 9, 7 / 18, 0, 1 / 3, 0, 7 / 18])
    np.testing.assert_allclose(d["r_precision"], [2 / 3, 2 / 3, 0, 1 / 3, 0, 2 / 3])
    np.testing.assert_array_equal(d["best_relevant_rank"], [1, 2, 4, 1, 4, 2])
    np.testing.assert_array_equal(d["num_relevant"], [3, 3, 1, 3, 1, 3])
    # category protocol (gallery = other products): q0: 2(rel) 4 | q1: 2(rel) 4 | q2: 1 0 3 5 (all rel)
    # q3: 2(.5, rel) and 4(.5) tie -> 2 first | q4: no relevant | q5: 4 then 2(rel)
    np.testing.assert_array_equal(
        d["top_other"][:, :4],
        [[2, 4, -1, -1], [2, 4, -1, -1], [1, 0, 3, 5], [2, 4, -1, -1], [3, 5, 1, 0], [4, 2, -1, -1]],
    )
    m = retrieval.evaluate_embeddings(x, class_ids, super_ids)
    assert m["num_queries"] == 6
    want_product = {
        "recall@1": 2 / 6,
        "recall@10": 1,
        "recall@100": 1,
        "recall@1000": 1,
        "map@r": 5 / 18,
        "r_precision": 7 / 18,
    }
    # q4's category holds no other product: no relevant item, so it is not a query of the
    # category protocol (as a single-image product is not one of the product protocol)
    want_category = {
        "recall@1": 4 / 5,
        "recall@5": 1,
        "recall@10": 1,
        "recall@20": 1,
        "precision@1": 4 / 5,
        "precision@5": 8 / 25,
        "precision@10": 4 / 25,
        "precision@20": 2 / 25,
        "map@10": 0.9,
    }  # q5: P(2) * 1 / 1 relevant = 1/2
    assert m["product"] == pytest.approx(want_product)
    assert m["category"] == pytest.approx(want_category)
    assert_metrics_equal(m, brute_force(x, class_ids, super_ids))


def test_an_undefined_protocol_is_none_with_a_reason_not_zero():
    """Labels that are categories (one product each): the category protocol has no relevant item
    for any query; one category: it is trivial. Either way None and why, never 0 or 100."""
    x = CHAIN[[0, 1, 2, 3, 4, 4]]
    every_category_one_product = retrieval.evaluate_embeddings(x, [0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3])
    assert set(every_category_one_product["category"].values()) - {None} == {
        "n/a: every category here holds a single product, so no query has a relevant item"
    }
    assert every_category_one_product["product"]["recall@1"] is not None
    one_category = retrieval.evaluate_embeddings(x, [0, 0, 1, 1, 2, 2], [1] * 6)
    assert one_category["category"]["why"].startswith("trivial: one category")
    assert one_category["category"]["recall@1"] is None
    single_images = retrieval.evaluate_embeddings(x, [0, 1, 2, 3, 4, 5], [1, 1, 1, 2, 2, 2])
    assert single_images["product"]["map@r"] is None and "two images" in single_images["product"]["why"]
    assert single_images["category"]["recall@1"] is not None
    for m, labels in (
        (every_category_one_product, ([0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3])),
        (one_category, ([0, 0, 1, 1, 2, 2], [1] * 6)),
        (single_images, ([0, 1, 2, 3, 4, 5], [1, 1, 1, 2, 2, 2])),
    ):
        assert_metrics_equal(m, brute_force(x, *map(np.array, labels)))
    # a category's row of its own: the same rule over its queries
    d = retrieval.retrieval_details(x, np.array([0, 0, 1, 1, 2, 3]), np.array([1, 1, 1, 1, 2, 2]))
    assert retrieval.metrics_from_details(d, mask=np.array([0, 0, 0, 0, 1, 1], bool))["product"]["why"]
    assert retrieval.metrics_from_details(d, mask=np.array([1, 1, 1, 1, 0, 0], bool))["category"]["map@10"] is not None


def test_ties_break_by_lower_index_and_self_is_excluded_by_index():
    # four images, products of 2; images 0, 1, 2 identical: every query ties with itself and others.
    # Dropping "the first column" instead of the query's own index would drop the wrong item.
    x = CHAIN[[0, 0, 0, 1]]
    class_ids = np.array([0, 1, 0, 1])
    d = retrieval.retrieval_details(x, class_ids, np.ones(4, int))
    # q0: 1(1) 2(1, rel) 3 -> rank 2 | q1: 0 2 3(rel) -> 3 | q2: 0(1, rel) 1 3 -> 1 | q3: 0 1(rel) 2 -> 2
    np.testing.assert_array_equal(d["best_relevant_rank"], [2, 3, 1, 2])
    m = retrieval.evaluate_embeddings(x, class_ids, np.ones(4, int))
    assert m["product"] == pytest.approx(
        {"recall@1": 0.25, "recall@10": 1.0, "recall@100": 1.0, "recall@1000": 1.0, "map@r": 0.25, "r_precision": 0.25}
    )
    # one category: every other-product image is relevant, the protocol is trivial (not 100%)
    assert m["category"]["why"].startswith("trivial") and m["category"]["precision@5"] is None


def test_recall_at_large_k_uses_the_exact_rank():
    # query 0's partner is the 150th best of 300 images: beyond the top-K list, counted exactly
    n = 300
    q = np.zeros(16, np.float32)
    q[0] = 1
    angles = np.linspace(0.01, 1.5, n - 1)  # distinct scores cos(angle), decreasing
    others = np.zeros((n - 1, 16), np.float32)
    others[:, 0] = np.cos(angles)
    others[:, 1] = np.sin(angles)
    x = np.vstack([q, others])
    class_ids = np.arange(n) + 1000
    class_ids[150] = class_ids[0]  # rank of image 150 for query 0 = 150 (149 images score higher)
    d = retrieval.retrieval_details(x, class_ids, np.ones(n, int))
    assert d["best_relevant_rank"][0] == 150
    m = retrieval.metrics_from_details(d, mask=np.arange(n) == 0)
    assert (m["product"]["recall@100"], m["product"]["recall@1000"]) == (0.0, 1.0)


def test_singleton_products_are_left_out_of_the_product_protocol():
    x = CHAIN[[0, 1, 2, 4]]
    class_ids = np.array([5, 5, 6, 7])  # products 6 and 7 have a single image
    m = retrieval.evaluate_embeddings(x, class_ids, np.array([1, 1, 1, 2]))
    assert m["num_queries"] == 4
    assert m["product"]["recall@1"] == 1.0 and m["product"]["map@r"] == 1.0  # queries 0 and 1 only
    assert m["category"]["recall@1"] == 1.0  # q3: its category has no other image, so it is no query


def test_map_at_10_denominator_is_relevant_items_in_top_10():
    # query 0 (product A) against 12 images of other products; relevant (category 1) at ranks 2, 5
    n_other = 12
    angles = np.linspace(0.1, 1.2, n_other)
    x = np.zeros((n_other + 2, 8), np.float32)
    x[0, 0] = x[1, 0] = 1  # query and its product partner (excluded from the category gallery)
    x[2:, 0] = np.cos(angles)
    x[2:, 1] = np.sin(angles)
    class_ids = np.array([0, 0] + list(range(1, n_other + 1)))
    super_ids = np.full(n_other + 2, 2)
    super_ids[[0, 1, 3, 6]] = 1  # gallery ranks: image 2 -> 1, image 3 -> 2, ..., image 6 -> 5
    d = retrieval.retrieval_details(x, class_ids, super_ids)
    m = retrieval.metrics_from_details(d, mask=np.arange(len(x)) == 0)["category"]
    assert m["map@10"] == pytest.approx((1 / 2 + 2 / 5) / 2)  # (P(2) + P(5)) / 2 relevant found
    assert (m["recall@1"], m["recall@5"], m["precision@5"], m["precision@10"]) == (0, 1, 0.4, 0.2)


# ============ brute force, pytorch-metric-learning, faiss ============


@pytest.mark.parametrize("chunk_size,threads,shuffle", [(256, 2, True), (300, 1, True), (1024, 2, False)])
def test_equals_brute_force_with_exact_ties(chunk_size, threads, shuffle):
    n = 2000
    x = exact_embeddings(n, seed=chunk_size)
    class_ids, super_ids = sop_like_labels(n, seed=threads, shuffle=shuffle)
    got = retrieval.evaluate_embeddings(x, class_ids, super_ids, chunk_size=chunk_size, num_threads=threads)
    assert_metrics_equal(got, brute_force(x, class_ids, super_ids))


def test_collapsed_embeddings_rank_by_index_alone():
    # every embedding identical (exactly, so every path computes the same 1.0): the tie rule
    # alone orders the gallery and nearly every query needs the exact-rank pass
    n = 400
    x = np.repeat(exact_embeddings(1, seed=3), n, axis=0)
    class_ids, super_ids = sop_like_labels(n, seed=4, shuffle=True)
    with pytest.warns(RuntimeWarning, match="collapsed"):
        got = retrieval.evaluate_embeddings(x, class_ids, super_ids, chunk_size=128)
    assert_metrics_equal(got, brute_force(x, class_ids, super_ids))
    with pytest.warns(RuntimeWarning, match="collapsed"):
        d = retrieval.retrieval_details(x[:6], [0, 1, 1, 0, 2, 2], np.ones(6))
    # by index alone: q0 sees 1 2 3(rel); q1: 0 2(rel); q2: 0 1(rel); q3: 0(rel); q4: 0 1 2 3 5(rel)
    np.testing.assert_array_equal(d["best_relevant_rank"], [3, 2, 2, 1, 5, 5])


def test_equals_brute_force_on_clustered_float_embeddings():
    # products clustered in embedding space, so most best-relevant ranks are small and a few
    # need the exact count; generic floats: equal up to float rounding of near-ties
    rng = np.random.default_rng(7)
    n = 2500
    class_ids, super_ids = sop_like_labels(n, seed=7)
    centres = rng.standard_normal((class_ids.max() + 1, 32)).astype(np.float32)
    x = centres[class_ids] + 1.2 * rng.standard_normal((n, 32)).astype(np.float32)
    got = retrieval.evaluate_embeddings(x, class_ids, super_ids, chunk_size=512)
    want = brute_force(x, class_ids, super_ids)
    assert 0.2 < want["product"]["recall@1"] < 0.95  # non-trivial
    assert_metrics_equal(got, want, atol=2 / n)


def test_equals_pytorch_metric_learning():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    rng = np.random.default_rng(11)
    n = 1200
    class_ids, super_ids = sop_like_labels(n, seed=11)
    centres = rng.standard_normal((class_ids.max() + 1, 24)).astype(np.float32)
    x = centres[class_ids] + 1.5 * rng.standard_normal((n, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),
    )
    # query = reference: pml then drops each query's own index from its neighbours
    ref = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(class_ids))
    ours = retrieval.evaluate_embeddings(x, class_ids, super_ids)["product"]
    assert 0.1 < ref["precision_at_1"] < 0.9
    assert ours["recall@1"] == pytest.approx(ref["precision_at_1"], abs=1 / n)
    assert ours["r_precision"] == pytest.approx(ref["r_precision"], abs=1 / n)
    assert ours["map@r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1 / n)


def test_knn_matches_faiss_and_brute_force():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    g = rng.standard_normal((3000, 48)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((200, 48)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, idx = knn.knn(q, g, 10, chunk_size=64)
    index = faiss.IndexFlatIP(48)
    index.add(g)
    f_scores, f_idx = index.search(q, 11)
    # compare rows whose neighbours are separated by more than float rounding
    gaps = np.diff(-f_scores, axis=1).min(1) > 1e-5
    assert gaps.sum() > 150
    np.testing.assert_array_equal(idx[gaps], f_idx[gaps, :10])
    np.testing.assert_allclose(scores, f_scores[:, :10], atol=1e-5)
    # exclusions: self by index, and whole groups
    s_self, i_self = knn.knn(g[:50], g[:50], 5, exclude_self=True)
    assert not (i_self == np.arange(50)[:, None]).any()
    groups = np.arange(3000) // 3
    _, i_grp = knn.knn(g, g, 5, query_groups=groups, gallery_groups=groups, chunk_size=700)
    assert not (groups[i_grp] == groups[:, None]).any()


def test_knn_ties_and_padding():
    x = CHAIN[[0, 0, 1, 0]]
    s, i = knn.knn(x[:1], x, 6, self_indices=[0])
    np.testing.assert_array_equal(i, [[1, 3, 2, -1, -1, -1]])  # ties (1, 3) by lower index
    np.testing.assert_array_equal(s[0, :3], [1, 1, 0.5])
    assert np.isneginf(s[0, 3:]).all()
    with pytest.raises(ValueError, match="exclude_self"):
        knn.knn(x[:2], x, 2, exclude_self=True)


def test_bounded_memory_and_input_checks():
    n = 8000  # a full similarity matrix would take 256 MB
    x = exact_embeddings(n, dim=32, seed=1)
    class_ids, super_ids = sop_like_labels(n, seed=1)
    tracemalloc.start()
    retrieval.evaluate_embeddings(x, class_ids, super_ids, chunk_size=512)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MB"
    bad = x[:10].copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval.evaluate_embeddings(bad, np.arange(10) // 2, np.ones(10))
    with pytest.raises(ValueError, match="class ids"):
        retrieval.evaluate_embeddings(x[:10], np.arange(9), np.ones(10))


# ============ embedding extraction ============


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.conv(x).mean((2, 3)))  # not normalised: extraction normalises


def test_extract_embeddings():
    torch.manual_seed(0)
    model = _Toy().train()
    images = torch.randn(10, 3, 12, 12)
    labels = torch.arange(10) // 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    emb, lab = extraction.extract_embeddings(model, loader, progress=False)
    assert emb.dtype == np.float32 and emb.shape == (10, 8) and lab.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(lab, labels.numpy())
    assert model.training  # mode restored
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.eval()(images), dim=1).numpy()  # dropout off
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_single_thread_blas_blocks_nest_and_restore():
    from threadpoolctl import threadpool_info

    def blas_threads():  # numpy's own BLAS (scipy, torch and faiss may bring others)
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    before = blas_threads()
    if not before:
        pytest.skip("numpy's BLAS is not visible to threadpoolctl here")
    outer = knn.SingleThreadBLAS()
    inner = knn.SingleThreadBLAS()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # overlapping, not nested: the limit holds until the last exit
    assert all(n == 1 for n in blas_threads())
    inner.__exit__(None, None, None)
    assert blas_threads() == before


def test_single_thread_blas_restores_across_threads():
    """Concurrent demo searches: the block that sets the limit and the one that restores it
    run on different threads; the original count must come back, and a later limit set from
    yet another thread must still take effect (threadpoolctl's controlling thread released)."""
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    before = blas_threads()
    if not before or max(before) < 2:
        pytest.skip("numpy's BLAS is not visible to threadpoolctl here, or runs one thread")
    first, second = knn.SingleThreadBLAS(), knn.SingleThreadBLAS()

    def in_thread(fn):
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    in_thread(first.__enter__)  # a worker thread sets the limit...
    second.__enter__()
    in_thread(lambda: first.__exit__(None, None, None))
    assert all(n == 1 for n in blas_threads())
    second.__exit__(None, None, None)  # ...and the main thread, last out, restores it
    assert blas_threads() == before

    seen = []

    def limit_and_read():
        with threadpool_limits(limits=1, user_api="blas"):
            seen.append(blas_threads())

    in_thread(limit_and_read)
    assert seen and all(n == 1 for n in seen[0])
    assert blas_threads() == before
