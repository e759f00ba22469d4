"""Where a catalogue's labels come from: the three layouts ``--data_root`` accepts.

* ``sop``: SOP's ``Ebay_train.txt`` / ``Ebay_test.txt`` (header ``image_id class_id
  super_class_id path``) with the images under ``<category>_final/``;
* ``csv``: a ``catalogue.csv`` with header ``path,product_id,category[,split]``: paths relative
  to the folder, ``product_id`` and ``category`` free strings, ``split`` train / test (without
  it, a seeded product-disjoint split, ``test_fraction`` of the products in test);
* ``folder``: a tree ``<category>/<product>/<image>`` or ``<product>/<image>`` (no category);
  the split as for a CSV without ``split``.

`detect_layout` tells them apart from what the folder holds (SOP first, then the CSV, then a
tree); `read_split` returns one split of any of them as a `CatalogueTable`.
"""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def is_image_name(name) -> bool:
    """True for a file name with an image extension (case-insensitive) that is not hidden
    (macOS ``._x.jpg`` resource forks and ``.DS_Store`` are not photos)."""
    name = str(name)
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)
