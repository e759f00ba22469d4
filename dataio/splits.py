"""The seeded product-disjoint split draw shared by the test and validation splits.

Each product falls on one side by the hash of (purpose, seed, its id) alone (`split_draw`), so
adding or removing products moves no other one; `split_products` draws a fraction of the
products, `split_validation` the validation products of a training split.
"""

import hashlib

import numpy as np


def split_draw(product_id, seed, purpose) -> float:
    """The uniform number in [0, 1) of one product in one draw: the first 8 bytes of
    ``blake2b("<purpose>:<seed>:<product id>")`` (UTF-8) as a big-endian integer over 2**64.
    ``purpose`` ("test", "val") keeps the test and validation draws independent."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{product_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_products(product_ids, fraction, seed=0, purpose="test"):
    """Boolean mask over ``product_ids`` (one per image, compared as strings): True for the
    images of the products whose `split_draw` (purpose, seed, id) is below ``fraction``.

    A per-product Bernoulli draw: a product's side depends on its id, the seed and the purpose
    only, so adding or removing products never moves another. The count is Binomial(P,
    fraction), not exactly ``round(fraction * P)`` (SOP's 11,318 training products at 0.1:
    1,132 +- 32). Two guards for tiny catalogues, the only case where other products matter:
    with ``fraction`` > 0 and at least 2 products, an empty draw takes the product of smallest
    draw, and a draw of every product leaves out the one of largest draw."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of products must be in [0, 1), got {fraction}")
    # object, not numpy's fixed-width str: that drops trailing NUL characters ("a\x00" == "a")
    ids = np.array([str(p) for p in product_ids], dtype=object)
    products, inverse = np.unique(ids, return_inverse=True)
    draws = np.asarray([split_draw(p, seed, purpose) for p in products.tolist()], dtype=np.float64)
    drawn = draws < fraction
    if fraction > 0 and len(products) >= 2 and not drawn.any():
        drawn[np.argmin(draws)] = True
    if len(products) and drawn.all():
        drawn[np.argmax(draws)] = False
    return drawn[inverse.reshape(-1)] if len(ids) else np.zeros(0, dtype=bool)


def split_validation(product_ids, val_fraction=0.1, seed=0):
    """Boolean mask over ``product_ids``: True for the validation products, the
    `split_products` draw of ``val_fraction`` with purpose "val" and seed ``seed``, so train and
    validation share no product and each product's side depends on its id only. Pass the
    data's product ids (strings), not class ids, which renumber when products are added. On
    SOP: about 1,132 of 11,318 products, about 6.0k of 59.6k images."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return split_products(product_ids, val_fraction, seed, purpose="val")
