"""train.py: flags (the original project's command verbatim, hyphenated spellings, argparse errors with the
allowed range), an end-to-end run and its outputs, exit code 1 on a non-finite loss and on a
failed checkpoint write (previous checkpoint intact), corrupt images counted in metrics.csv.

Tiny on purpose: 60 synthetic products at 48 px, ResNet18 from random weights at 32 px,
2 steps per epoch, one thread (2 shared cores: more threads only add contention).
"""

import errno
import json
from pathlib import Path
import shutil

import pytest
from support import SEED_COMMAND, assert_checkpoint_loads, parse, read_rows, tiny_argv
import torch

import checkpoints
import datasets
import losses
import models
import train
from training import flags

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ============ flags ============


def test_seed_command_parses_verbatim():
    args = parse(SEED_COMMAND)
    assert (args.dataset, args.backbone, args.batch_size, args.epochs) == ("stanford", "efficientnet_b0", 64, 10)
    assert (args.lr, args.margin, args.embedding_size) == (1e-4, 0.5, 128)
    # the original project's other defaults
    assert (args.weight_decay, args.lr_factor, args.lr_patience, args.weights) == (1e-5, 0.5, 3, "imagenet")
    assert (args.images_per_class, args.mining) == (4, "semihard")
    assert args.amp is None and args.image_size == 224  # None: AMP on CUDA only (Process.of)
    # ImageNet weights: the recommended recipe; --recipe original: the original project's own
    resolved = flags.resolve_recipe(args)
    assert (resolved.recipe, resolved.loss, resolved.sampler) == (
        "pretrained",
        flags.RECIPES["pretrained"]["loss"],
        flags.RECIPES["pretrained"]["sampler"],
    )
    original = flags.resolve_recipe(parse(SEED_COMMAND + ["--recipe", "original"]))
    assert (original.loss, original.sampler, original.head, original.select_metric) == (
        "triplet",
        "random",
        "mlp",
        "recall@1",
    )


def test_hyphenated_spellings_and_amp_switch():
    args = parse(
        [
            "--batch-size",
            "32",
            "--images-per-class",
            "2",
            "--embedding-size",
            "64",
            "--weight-decay",
            "0",
            "--max-steps-per-epoch",
            "3",
            "--run-name",
            "x",
            "--no-amp",
        ]
    )
    assert (args.batch_size, args.images_per_class, args.embedding_size) == (32, 2, 64)
    assert (args.weight_decay, args.max_steps_per_epoch, args.run_name, args.amp) == (0.0, 3, "x", False)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch_size", "30"], "must be a multiple of --images_per_class (4)"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--lr", "-0.001"], "--lr must be a finite number > 0"),
        (["--margin", "0"], "--margin must be > 0"),
        (["--margin", "-1"], "--margin must be > 0"),
        (["--images_per_class", "1"], "--images_per_class must be >= 2"),
        (["--backbone", "vgg16"], "invalid choice: 'vgg16'"),
        (["--loss", "contrastive"], "invalid choice: 'contrastive'"),
        (["--val_split", "train"], "invalid choice: 'train'"),
        (["--sampler", "balanced"], "invalid choice: 'balanced'"),
        (["--resume", "/nonexistent/last.pth"], "no such checkpoint"),
        (["--epochs", "-1"], "--epochs must be >= 0"),
        # checked once the data is loaded: the tiny training split's products have 2..12 images
        (["--images_per_class", "13", "--batch_size", "26"], "outside the allowed range 2..12"),
        (["--batch_size", "400"], "28 products and at most 12 images of one, too few for batches of 400"),
    ],
)
def test_bad_arguments_are_argparse_errors(tiny_sop, tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) as exc:
        train.cli(tiny_argv(tiny_sop, tmp_path, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and expected in err, err
    assert not (tmp_path / "checkpoints" / "t" / "last.pth").exists()


# ============ a whole run ============


@pytest.mark.slow
def test_end_to_end_outputs(tiny_sop, tmp_path):
    final = train.main(parse(tiny_argv(tiny_sop, tmp_path)))
    ckpt_dir, log_dir = tmp_path / "checkpoints" / "t", tmp_path / "runs" / "t"

    rows = read_rows(log_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    # epoch 0: validation of the untouched network, no training columns
    assert rows[0]["train_loss"] == "" and rows[0]["val_recall@1"] != ""
    for col in (
        "train_loss",
        "val_loss",
        "val_recall@1",
        "train_valid_triplets",
        "train_active_triplets",
        "lr",
        "images_per_sec",
        "epoch_time",
        "bad_images",
    ):
        assert rows[-1][col] != "", col
    # P x K batches of 4 products x 4 images: every anchor has a positive and a negative
    assert float(rows[1]["train_valid_triplets"]) == 16.0
    assert float(rows[-1]["images"]) == 2 * 16
    assert final["epoch"] == 2 and final["val_recall@1"] == float(rows[-1]["val_recall@1"])

    last = assert_checkpoint_loads(ckpt_dir / "last.pth")
    best = assert_checkpoint_loads(ckpt_dir / "best.pth")
    assert last["epoch"] == 2 and last["format_version"] == checkpoints.CHECKPOINT_FORMAT_VERSION
    assert last["model_args"] == {
        "backbone": "resnet18",
        "embedding_size": 128,
        "dropout": 0.2,
        "image_size": 32,
        "head": "mlp",
    }
    maps = [float(r["val_map@r"]) for r in rows]  # --weights none: the scratch recipe's metric
    assert best["epoch"] == maps.index(max(maps))  # first epoch reaching the best
    assert isinstance(last["rng"]["torch"], torch.Tensor) and last["args"]["lr"] == 1e-3
    assert [h["epoch"] for h in last["history"]] == [0, 1, 2]
    model = models.load_model(ckpt_dir / "best.pth")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)

    info = json.loads((log_dir / "args.json").read_text())
    assert info["backbone"] == "resnet18" and info["world_size"] == 1
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "projector_config.pbtxt").is_file()  # embedding projector with thumbnails
    assert list(log_dir.rglob("sprite.png")) and list(log_dir.rglob("metadata.tsv"))
    assert not list(ckpt_dir.glob(".*tmp"))

    # The same command again must not silently overwrite that run.
    with pytest.raises(flags.ArgumentCheckError, match="--resume auto"):
        train.main(parse(tiny_argv(tiny_sop, tmp_path)))


def test_random_sampler_runs(tiny_sop, tmp_path):
    train.main(parse(tiny_argv(tiny_sop, tmp_path, "--sampler", "random", "--epochs", "1", "--projector_samples", "0")))
    rows = read_rows(tmp_path / "runs" / "t" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[1]["train_valid_triplets"]) <= 16.0


# ============ failures: exit code 1, last good checkpoint intact ============


class _NaNAfterEpoch0(torch.nn.Module):
    """The real criterion, but the training loss (under autograd) of every batch is NaN."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, embeddings, labels):
        loss, stats = self.inner(embeddings, labels)
        return (loss * float("nan") if torch.is_grad_enabled() else loss), stats


def test_non_finite_loss_exits_1(tiny_sop, tmp_path, monkeypatch, capsys):
    real = losses.build_loss
    monkeypatch.setattr(losses, "build_loss", lambda *a, **kw: _NaNAfterEpoch0(real(*a, **kw)))
    assert train.cli(tiny_argv(tiny_sop, tmp_path, "--projector_samples", "0")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at epoch 1, step 1/2" in err, err
    last = assert_checkpoint_loads(tmp_path / "checkpoints" / "t" / "last.pth")
    assert last["epoch"] == 0  # the last good one
    assert [r["epoch"] for r in read_rows(tmp_path / "runs" / "t" / "metrics.csv")] == ["0"]


def test_failed_checkpoint_write_exits_1_previous_intact(tiny_sop, tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint write (epoch 1) hits a full disk
        calls.append(f)
        if len(calls) == 2:
            real_save(obj, f, *args, **kwargs)  # part of the bytes reach the temporary file...
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert train.cli(tiny_argv(tiny_sop, tmp_path, "--projector_samples", "0")) == 1
    err = capsys.readouterr().err
    ckpt_dir = tmp_path / "checkpoints" / "t"
    assert f"could not write {ckpt_dir / 'last.pth'}" in err and "No space left" in err, err
    assert "--resume auto" in err
    assert assert_checkpoint_loads(ckpt_dir / "last.pth")["epoch"] == 0
    assert not list(ckpt_dir.glob(".*tmp"))  # the temporary file is gone too


@pytest.mark.slow
def test_corrupt_images_are_counted(tiny_sop, tmp_path):
    root = tmp_path / "sop"
    shutil.copytree(tiny_sop, root)
    test_set = datasets.SOPDataset(root, "test")  # 154 images: one bad one is < 1%
    good = Path(test_set.paths[5]).read_bytes()
    Path(test_set.paths[5]).write_bytes(b"")
    train.main(parse(tiny_argv(root, tmp_path, "--val_split", "test", "--epochs", "1", "--projector_samples", "0")))
    rows = read_rows(tmp_path / "runs" / "t" / "metrics.csv")
    assert [float(r["bad_images"]) for r in rows] == [1.0, 1.0]
    # The count is the run's, not the process's: a resumed run starts from the checkpoint's
    # list (here the file was repaired meanwhile, so only that list can report it).
    Path(test_set.paths[5]).write_bytes(good)
    train.main(
        parse(
            tiny_argv(
                root, tmp_path, "--val_split", "test", "--epochs", "2", "--projector_samples", "0", "--resume", "auto"
            )
        )
    )
    rows = read_rows(tmp_path / "runs" / "t" / "metrics.csv")
    assert [float(r["bad_images"]) for r in rows] == [1.0, 1.0, 1.0]
