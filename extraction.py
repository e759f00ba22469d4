"""Embedding extraction: a model's unit embeddings of every batch of a loader, as numpy arrays."""

from __future__ import annotations

import numpy as np

# torch is imported where it is used: importing this module stays cheap


def extract_embeddings(model, loader, device="cpu", amp=None, progress=True, desc="embedding", normalize=True):
    """Embed every batch of ``loader`` (yielding ``(images, class_ids)``) with ``model``.

    Returns ``(embeddings float32 [N, D] unit rows, labels int64 [N])`` as numpy arrays, in
    loader order. Runs under ``torch.inference_mode``; AMP (float16 autocast) is on by
    default on CUDA only, where it roughly doubles throughput; inputs go channels_last,
    which convolutions prefer on both CPU and GPU. The model's train/eval mode is restored.
    ``normalize=False`` returns the model's outputs as they are (e.g. raw backbone features).
    """
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device)
    if amp is None:
        amp = device.type == "cuda"
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    try:
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=device.type,
                dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                enabled=bool(amp),
            ),
        ):
            for images, targets in tqdm(
                loader, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True, leave=False
            ):
                images = images.to(device, non_blocking=True)
                if images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                out = model(images)
                # re-normalise in float32: half-precision outputs drift off the unit sphere
                out = torch.nn.functional.normalize(out.float(), dim=1) if normalize else out.float()
                embeddings.append(out.cpu())
                labels.append(torch.as_tensor(targets).reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not embeddings:
        raise ValueError(f"{desc}: the loader yielded no batches (empty dataset?)")
    return (
        torch.cat(embeddings).numpy().astype(np.float32, copy=False),
        torch.cat(labels).numpy().astype(np.int64, copy=False),
    )
