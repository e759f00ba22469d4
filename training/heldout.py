"""Whether an evaluation is held out: the products a run trained and validated on (recorded in
its checkpoint as ``products``, see models.py) against the products of the split it is scored on.

Definitions (docs/reference.md, "held_out"):

* the record: ``{"train": [...], "val": [...]}``, the sorted distinct product ids (the data's
  strings) of the run's training split (``--train_split``) and validation split
  (``--val_split``); ``--val_split test`` therefore records the test products;
* a split is held out from a run when none of its products is in the record and the run did not
  validate on the test split; ``held_out`` is true, false, or null when it cannot be known (a
  checkpoint without the record);
* product ids are compared as strings, whatever catalogue they come from: a catalogue whose
  ids merely coincide with the run's (SOP's class numbers, say) counts as overlapping.
"""

from __future__ import annotations

import numpy as np

from dataio import catalogue

# How many overlapping product ids an error message names.
NAMED_PRODUCTS = 5


class OverlapError(catalogue.DatasetError):
    """The test split holds products the run trained or validated on (see `check`)."""


def product_record(train_set, val_set) -> dict:
    """The checkpoint's ``products`` field: the sorted distinct product ids of the two splits
    (datasets.SOPDataset or anything with ``product_ids``)."""
    return {
        "train": np.unique(np.asarray(train_set.product_ids, dtype=str)).tolist(),
        "val": np.unique(np.asarray(val_set.product_ids, dtype=str)).tolist(),
    }


def overlap(record: dict, product_ids) -> list[str]:
    """The sorted distinct ids among ``product_ids`` that the record trained or validated on."""
    seen = set(record.get("train") or ()) | set(record.get("val") or ())
    return sorted(set(map(str, product_ids)) & seen)


def check(record: dict | None, train_args: dict | None, dataset, run: str, allow_overlap: bool = False) -> dict:
    """``{"held_out": True | False | None, "why": str | None}`` for scoring ``run`` (its
    checkpoint's ``products`` record and training args) on ``dataset``. A test split with
    recorded products raises OverlapError naming how many and a few, unless ``allow_overlap``."""
    train_args = train_args or {}
    if record is None:
        if train_args.get("val_split") == "test" and dataset.split == "test":
            return {"held_out": False, "why": f"{run} validated on the test split (--val_split test)"}
        return {
            "held_out": None,
            "why": f"{run}'s checkpoint has no record of its training products "
            "(written before the record existed): not verifiable",
        }
    shared = overlap(record, dataset.product_ids)
    if not shared:
        return {"held_out": True, "why": None}
    total = len(set(map(str, dataset.product_ids)))
    what = (
        f"{len(shared)} of the {total} products of the {dataset.split} split of {dataset.root} were "
        f"trained or validated on by {run} ({catalogue.format_paths(shared, NAMED_PRODUCTS)})"
    )
    if dataset.split == "test" and not allow_overlap:
        raise OverlapError(
            f"{what}, so its figures would not be held out. Evaluate on data the run never saw (its own "
            "test split, another catalogue: --data_root), or pass --allow_overlap to score it anyway "
            '(results.json then says "held_out": false)'
        )
    return {"held_out": False, "why": what}
