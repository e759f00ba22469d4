"""The reference the tiled metrics engine (retrieval.evaluate_embeddings) is tested against:
both protocols by their definitions over the full N x N similarity matrix."""

import numpy as np

import retrieval


def reference_metrics(embeddings, class_ids, super_ids) -> dict:
    """Both protocols' metrics by their definitions (retrieval's module docstring), over the full N x N
    similarity matrix: O(N^2) memory, for small N only (tests compare retrieval's tiled engine
    against it, on random and on tied inputs). Same result shape as evaluate_embeddings.

    Tie rule: a stable sort of the scores in decreasing order, so equal scores keep the lower
    gallery index first. The query is removed by index (its own cell set to -inf), never by
    dropping the first column. Category protocol: the query's whole product is removed.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    class_ids, super_ids = np.asarray(class_ids), np.asarray(super_ids)
    s = (x @ x.T).astype(np.float32)
    n = len(x)
    same = class_ids[:, None] == class_ids[None, :]
    # product protocol: everything but the query itself
    sp = s.copy()
    np.fill_diagonal(sp, -np.inf)
    order = np.argsort(-sp, axis=1, kind="stable")[:, : n - 1]
    rel = np.take_along_axis(same, order, axis=1)
    r = same.sum(1) - 1
    has = r > 0  # a product of one image has no relevant item: left out of the averages
    first = np.argmax(rel, axis=1) + 1
    ranks = np.arange(1, n)
    in_r = rel & (ranks[None, :] <= r[:, None])
    precision = np.cumsum(rel, axis=1) / ranks
    if has.any():
        product = {f"recall@{k}": float(np.mean(first[has] <= k)) for k in retrieval.PRODUCT_RECALL_KS}
        product["map@r"] = float(np.mean(((precision * in_r).sum(1) / np.maximum(r, 1))[has]))
        product["r_precision"] = float(np.mean((in_r.sum(1) / np.maximum(r, 1))[has]))
    else:
        product = retrieval.undefined(retrieval.PRODUCT_METRICS, retrieval.product_undefined_reason(r))
    # category protocol: the query's own product is not in the gallery; a query whose category
    # holds no other product has no relevant item and is left out, like in the product protocol
    same_category = super_ids[:, None] == super_ids[None, :]
    has_c = (same_category & ~same).sum(1)
    why = retrieval.category_undefined_reason(has_c, len(np.unique(super_ids)))
    if why:
        return {"product": product, "category": retrieval.undefined(retrieval.CATEGORY_METRICS, why), "num_queries": n}
    top_k = max(retrieval.CATEGORY_KS)
    order = np.argsort(-np.where(same, -np.inf, s), axis=1, kind="stable")[:, :top_k]
    valid = np.take_along_axis(~same, order, axis=1)
    relc = valid & (super_ids[order] == super_ids[:, None])
    relc = np.pad(relc, ((0, 0), (0, top_k - relc.shape[1])))[has_c > 0]  # galleries under 20 images
    category = {f"recall@{k}": float(relc[:, :k].any(1).mean()) for k in retrieval.CATEGORY_KS}
    category.update({f"precision@{k}": float((relc[:, :k].sum(1) / k).mean()) for k in retrieval.CATEGORY_KS})
    top = relc[:, : retrieval.CATEGORY_MAP_AT]
    hits = top.sum(1)
    p = np.cumsum(top, axis=1) / np.arange(1, retrieval.CATEGORY_MAP_AT + 1)
    category[f"map@{retrieval.CATEGORY_MAP_AT}"] = float(
        np.mean(np.where(hits > 0, (p * top).sum(1) / np.maximum(hits, 1), 0.0))
    )
    return {"product": product, "category": category, "num_queries": n}
