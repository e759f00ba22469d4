"""train.py under torchrun: 2 CPU processes, gloo backend, the default recipe's DDP paths (head-only
warm-up ending inside an epoch, frozen BatchNorm, PCA-initialised head; triplet, and Proxy-Anchor
with gathered embeddings), rank-sharded P x K batches, rank 0 alone validating / logging / saving;
both ranks hold identical weights before and after every epoch; a run killed mid-way resumes
under torchrun to the same weights as a run that was never killed; --gather_embeddings gives the
loss and the step of one process over the ranks' concatenated batches."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest
from support import assert_checkpoint_loads, read_rows, tiny_argv
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losses
from training import distributed, loop, runs

WORKER = Path(__file__).resolve().parent / "fixtures" / "ddp_worker.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
    ),
]


def torchrun(argv, cwd, state_dir, kill_at=None, timeout=300):
    """train.py's command line under torchrun (2 processes), through the fixture that saves each
    rank's state per epoch into ``state_dir``; returns the CompletedProcess."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "DDP_STATE_DIR": str(state_dir),
    }
    env.pop("DDP_KILL_AT", None)
    if kill_at:
        env["DDP_KILL_AT"] = kill_at
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def succeeded(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def recipe_argv(root, out, *extra):
    """The default recipe of --weights imagenet (pretrained: PCA-whitened linear head, frozen
    BatchNorm, head-only warm-up) from random weights, tiny: the warm-up ends after the first
    of epoch 1's two steps, so DDP changes phase inside an epoch."""
    return tiny_argv(
        root,
        out,
        "--recipe",
        "pretrained",
        "--weights",
        "none",
        "--embedding_size",
        "16",
        "--pca_images",
        "64",
        "--warmup_epochs",
        "0.5",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--deterministic",
        "--projector_samples",
        "0",
        *extra,
    )


def load_states(state_dir, when, epoch):
    return [torch.load(Path(state_dir) / f"rank{r}_{when}{epoch}.pt", weights_only=True) for r in (0, 1)]


def assert_same_state(a, b, what):
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{what}: {part} tensors differ: {differ[:5]}"


def assert_ranks_agree(state_dir, epochs):
    for epoch in range(1, epochs + 1):
        for when in ("before", "after"):
            assert_same_state(*load_states(state_dir, when, epoch), f"rank 0 vs rank 1 {when} epoch {epoch}")


def test_default_recipe_ranks_agree_and_a_killed_run_resumes_to_the_same_weights(tiny_sop, tmp_path):
    # ============ run A: never killed ============
    a = tmp_path / "a"
    out = succeeded(torchrun(recipe_argv(tiny_sop, a), tmp_path, a / "states"))
    assert out.count("epoch 1/2 |") == 1 and out.count("epoch 2/2 |") == 1  # only rank 0 logs
    assert "head initialised with the PCA whitening of" in out
    info = json.loads((a / "runs" / "t" / "args.json").read_text())
    assert info["world_size"] == 2 and info["resolved_device"] == "cpu" and info["recipe"] == "pretrained"
    rows = read_rows(a / "runs" / "t" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    # warm-up: 1 of epoch 1's 2 steps trained the head alone; 2 steps x 16 images x 2 ranks
    assert [float(r["train_frozen_steps"]) for r in rows[1:]] == [1.0, 0.0]
    assert all(float(r["images"]) == 2 * 2 * 16 for r in rows[1:])
    assert_ranks_agree(a / "states", epochs=2)
    start, end = load_states(a / "states", "before", 1)[0]["model"], load_states(a / "states", "after", 2)[0]["model"]
    bn_stats = [k for k in start if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
    convs = [k for k in start if k.startswith("backbone.") and k.endswith("conv1.weight")]
    assert bn_stats and convs
    assert all(torch.equal(start[k], end[k]) for k in bn_stats)  # frozen BatchNorm statistics
    assert not any(torch.equal(start[k], end[k]) for k in convs)  # the backbone trained after warm-up
    last = assert_checkpoint_loads(a / "checkpoints" / "t" / "last.pth")
    assert not any(k.startswith("module.") for k in last["model"])  # saved from the bare network

    # ============ run B: rank 1 killed as epoch 2 starts, then --resume auto ============
    b = tmp_path / "b"
    killed = torchrun(recipe_argv(tiny_sop, b), tmp_path, b / "states", kill_at="2:1")
    assert killed.returncode != 0
    assert torch.load(b / "checkpoints" / "t" / "last.pth", weights_only=True)["epoch"] == 1
    out = succeeded(torchrun(recipe_argv(tiny_sop, b, "--resume", "auto"), tmp_path, b / "states"))
    assert "resuming from" in out
    rows_b = read_rows(b / "runs" / "t" / "metrics.csv")
    assert [r["epoch"] for r in rows_b] == ["0", "1", "2"]
    assert_ranks_agree(b / "states", epochs=2)
    assert_same_state(
        load_states(a / "states", "after", 2)[0],
        load_states(b / "states", "after", 2)[0],
        "killed and resumed vs never killed",
    )
    for row_a, row_b in zip(rows, rows_b):
        assert {k: v for k, v in row_a.items() if k not in runs.TIMING_COLUMNS} == {
            k: v for k, v in row_b.items() if k not in runs.TIMING_COLUMNS
        }


def test_proxy_anchor_with_gathered_embeddings_keeps_ranks_and_proxies_identical(tiny_sop, tmp_path):
    out = succeeded(
        torchrun(
            recipe_argv(tiny_sop, tmp_path, "--loss", "proxy_anchor", "--gather_embeddings"),
            tmp_path,
            tmp_path / "states",
        )
    )
    assert out.count("epoch 2/2 |") == 1
    assert_ranks_agree(tmp_path / "states", epochs=2)
    before, after = (
        load_states(tmp_path / "states", when, e)[0]["criterion"]["proxies"]
        for when, e in (("before", 1), ("after", 2))
    )
    assert before.shape[1] == 16 and not torch.equal(before, after)  # the proxies trained
    rows = read_rows(tmp_path / "runs" / "t" / "metrics.csv")
    # gathered: every step's loss sees both ranks' batches of 4 products (a rank alone: 4)
    assert all(float(r["train_pos_proxies"]) > 4.0 for r in rows[1:])


# ============ --gather_embeddings: one process over the concatenated batches ============


class TinyNet(torch.nn.Module):
    """An EmbeddingNet's shape (backbone, head, unit outputs) small enough for exact comparisons."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        return torch.nn.functional.normalize(self.head(self.backbone(x)), dim=1)


def batch():
    """Two ranks' batches of 8 (4 products x 2 images each; product 3 on both ranks)."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 2, 2, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 6, 6])
    return images, labels


def one_step(images, labels, loss_name, world, gather):
    """loop.train_one_epoch for one step with plain SGD at lr 1 (the update is the gradient);
    returns (reported loss, the network's and the loss's parameters after the step)."""
    model = TinyNet()
    criterion = (
        losses.build_loss("proxy_anchor", classes=range(7), embedding_size=4)
        if loss_name == "proxy_anchor"
        else losses.build_loss("triplet", mining="batch_all")
    )
    params = list(model.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = loop.train_one_epoch(
        model,
        criterion,
        [(images, labels)],
        optimizer,
        scaler,
        torch.device("cpu"),
        1,
        steps=1,
        world_size=world,
        progress=False,
        gather_embeddings=gather,
        replicas=distributed.Replicas(model, world, torch.device("cpu")),
    )
    return stats["loss"], [p.detach().clone() for p in params]


def gather_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        images, labels = batch()
        mine = slice(8 * rank, 8 * rank + 8)
        results = {
            name: {gather: one_step(images[mine], labels[mine], name, 2, gather) for gather in (True, False)}
            for name in ("triplet", "proxy_anchor")
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_embeddings_give_the_loss_and_step_of_one_process(tmp_path):
    mp.spawn(gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    images, labels = batch()
    for name in ("triplet", "proxy_anchor"):
        loss, params = one_step(images, labels, name, 1, False)
        for rank in ranks:
            gathered_loss, gathered_params = rank[name][True]
            assert gathered_loss == pytest.approx(loss, rel=1e-6)
            for got, want in zip(gathered_params, params):
                assert torch.allclose(got, want, atol=1e-6), name
        # without gathering, each rank mines its own half: another loss (the test can tell)
        assert ranks[0][name][False][0] != pytest.approx(loss, rel=1e-6)


def test_ddp_ranks_get_disjoint_batches(tiny_sop):
    """The sampler train.py builds for rank r of 2: other batches on each rank, the same count
    (DDP needs equal step counts), each batch 4 products x 4 images."""
    import datasets
    import samplers

    class_ids = datasets.SOPDataset(tiny_sop, "train").class_ids
    batches = []
    for rank in range(2):
        sampler = samplers.build_batch_sampler("pk", class_ids, 16, 4, seed=0, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        batches.append(list(sampler))
    assert len(batches[0]) == len(batches[1]) > 0
    assert all(a != b for a, b in zip(*batches))
    for batch_ in batches[0] + batches[1]:
        _, counts = torch.unique(torch.as_tensor(class_ids[batch_]), return_counts=True)
        assert counts.tolist() == [4, 4, 4, 4]
