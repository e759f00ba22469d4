"""What the network sees: the ImageNet normalisation and the training / evaluation transforms.

The evaluation preprocessing of an image for a network of input size s:

    square resize to r = round(s * 256 / 224)  (the whole product kept in view)
    -> centre crop s x s at offset round((r - s) / 2)  (as torchvision's CenterCrop)
    -> [0, 1] -> (x - IMAGENET_MEAN) / IMAGENET_STD, per channel

This module owns those numbers: ``datasets`` builds its transforms here, the serving fast path
(``search.engine``) takes its resize size, crop offset and mean / std from here, and the ONNX
example (docs/onnx_example.py) keeps a copy that a test holds equal to them.
"""

from __future__ import annotations

import torchvision.transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Side of the square resize before the crop: 256 for 224, as in the original project."""
    return int(round(image_size * 256 / 224))


def crop_offset(image_size: int) -> int:
    """Offset of the centre crop in the resized square, on both axes (as T.CenterCrop rounds it)."""
    return int(round((resize_size(image_size) - image_size) / 2.0))


def build_transform(image_size=224, train=False):
    """The original project's augmentations, scaled to ``image_size`` (its numbers at 224).

    train: Resize((r, r)) → RandomResizedCrop(image_size, scale=(0.8, 1)) → horizontal flip
    → ColorJitter(0.2, 0.2, 0.2) → RandomRotation(15) → ToTensor → ImageNet normalisation;
    eval: Resize((r, r)) → CenterCrop(image_size) → ToTensor → normalisation;
    r = resize_size(image_size). The square resize keeps the whole product in view.
    """
    r = resize_size(image_size)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose(
            [
                T.Resize((r, r)),
                T.RandomResizedCrop(image_size, scale=(0.8, 1.0)),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                T.RandomRotation(15),
                T.ToTensor(),
                normalize,
            ]
        )
    return T.Compose([T.Resize((r, r)), T.CenterCrop(image_size), T.ToTensor(), normalize])


def draft_size(transform):
    """The decode size ``load_image`` may draft to for ``transform``: the size of a leading
    ``Resize`` (the larger side for a (h, w) size), None when the transform does not start
    with a resize (then the full image is needed)."""
    first = transform.transforms[0] if isinstance(transform, T.Compose) and transform.transforms else transform
    if isinstance(first, T.Resize):
        size = first.size
        return int(max(size)) if isinstance(size, (list, tuple)) else int(size)
    return None
