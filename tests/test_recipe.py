"""train.py's recipe flags: --recipe defaults and their resolution, range errors (exit 2), head-only
warm-up (fractional), frozen BatchNorm statistics, per-group learning rates, PCA head
initialisation, Proxy-Anchor end to end with resume, --select_metric for best.pth, and the
epoch-0 zero-shot row of metrics.csv.

Tiny runs as in test_train.py: ResNet18 from random weights at 32 px, 2 steps per epoch.
"""

import numpy as np
import pytest
from support import SEED_COMMAND, parse, read_rows, tiny_argv
import torch

import extraction
import losses
import models
import retrieval
import train
from training import arg_checks, flags, loop, setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ckpt(out, name="last.pth", run="t"):
    return torch.load(out / "checkpoints" / run / name, map_location="cpu", weights_only=True)


def backbone_state(state):
    return {k: v for k, v in state["model"].items() if k.startswith("backbone.")}


def is_bn_stat(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


# ============ recipes and their flags ============


def test_recipes_resolve_and_explicit_flags_win():
    pre = flags.resolve_recipe(parse(["--weights", "imagenet"]))
    assert pre.recipe == "pretrained"
    assert {k: getattr(pre, k) for k in flags.RECIPES["pretrained"]} == flags.RECIPES["pretrained"]
    assert flags.resolve_recipe(parse(["--weights", "none"])).recipe == "scratch"
    orig = flags.resolve_recipe(parse(["--recipe", "original", "--lr", "3e-4"]))
    assert (orig.sampler, orig.loss, orig.head, orig.select_metric) == ("random", "triplet", "mlp", "recall@1")
    assert orig.lr == 3e-4 and orig.warmup_epochs == 0.0 and orig.freeze_bn is False
    assert flags.resolve_recipe(orig) == orig  # idempotent
    # the original project's command still parses, and takes the recommended recipe
    seed = flags.resolve_recipe(parse(train_seed_command()))
    assert seed.recipe == "pretrained" and seed.margin == 0.5 and seed.lr == 1e-4


def train_seed_command():
    return list(SEED_COMMAND)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--warmup_epochs", "-1"], "--warmup_epochs must be a finite number >= 0"),
        (["--warmup_epochs", "nan"], "--warmup_epochs must be a finite number >= 0"),
        (["--head_lr_mult", "0"], "--head_lr_mult must be a finite number > 0"),
        (["--proxy_lr_mult", "-2"], "--proxy_lr_mult must be a finite number > 0"),
        (["--val_fraction", "1.5"], "--val_fraction must be in (0, 1)"),
        (["--head_init", "pca", "--pca_images", "10"], "--pca_images must be >= --embedding_size (128)"),
        (["--head_init", "pca", "--head", "mlp", "--embedding_size", "300"], "needs --embedding_size <= 256"),
        (["--select_metric", "accuracy"], "invalid choice: 'accuracy'"),
        (["--head", "conv"], "invalid choice: 'conv'"),
        (["--head_init", "xavier"], "invalid choice: 'xavier'"),
        (["--recipe", "fast"], "invalid choice: 'fast'"),
    ],
)
def test_bad_recipe_values_exit_2_with_the_allowed_range(tiny_sop, tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) as exc:
        train.cli(tiny_argv(tiny_sop, tmp_path, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and expected in err, err


def test_param_groups_carry_the_multipliers():
    args = flags.resolve_recipe(
        parse(["--weights", "none", "--lr", "1e-3", "--head_lr_mult", "10", "--proxy_lr_mult", "100"])
    )
    model = models.build_model("resnet18", embedding_size=8)
    crit = losses.build_loss("proxy_anchor", classes=[1, 2, 3], embedding_size=8)
    groups = {g["name"]: g for g in setup.param_groups(model, crit, args)}
    assert groups["backbone"]["lr"] == 1e-3 and groups["head"]["lr"] == pytest.approx(1e-2)
    assert groups["loss"]["lr"] == pytest.approx(0.1) and groups["loss"]["params"][0] is crit.proxies
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == models.count_parameters(model) + crit.proxies.numel()
    no_params = setup.param_groups(model, losses.build_loss("triplet"), args)
    assert [g["name"] for g in no_params] == ["backbone", "head"]


def test_adamw_decays_weights_only():
    args = flags.resolve_recipe(
        parse(["--weights", "none", "--optimizer", "adamw", "--weight_decay", "0.05", "--head", "mlp"])
    )
    model = models.build_model("resnet18", embedding_size=8, head="mlp")
    crit = losses.build_loss("proxy_anchor", classes=[1, 2, 3], embedding_size=8)
    groups = {g["name"]: g for g in setup.param_groups(model, crit, args)}
    assert sorted(groups) == ["backbone", "backbone_no_decay", "head", "head_no_decay", "loss"]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in ("backbone", "head") for p in groups[g]["params"]}
    kept = {names[id(p)] for g in ("backbone_no_decay", "head_no_decay") for p in groups[g]["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert "backbone.conv1.weight" in decayed and "head.0.weight" in decayed
    assert "backbone.bn1.weight" in kept and "backbone.bn1.bias" in kept and "head.0.bias" in kept
    assert all(model.get_parameter(n).ndim > 1 for n in decayed)
    assert [groups[g]["weight_decay"] for g in sorted(groups)] == [0.05, 0.0, 0.05, 0.0, 0.0]
    assert groups["loss"]["params"] == [crit.proxies]  # proxies: no decay
    assert groups["head_no_decay"]["lr"] == groups["head"]["lr"] == pytest.approx(args.lr * args.head_lr_mult)
    optimizer = flags.OPTIMIZERS[args.optimizer](list(groups.values()), lr=args.lr, weight_decay=args.weight_decay)
    assert isinstance(optimizer, torch.optim.AdamW)
    # decoupled: a step with zero gradients shrinks a decayed weight by lr x wd, nothing else moves
    for p in list(model.parameters()) + [crit.proxies]:
        p.grad = torch.zeros_like(p)
    conv, bn, proxies = (
        model.backbone.conv1.weight.detach().clone(),
        model.backbone.bn1.weight.detach().clone(),
        crit.proxies.detach().clone(),
    )
    optimizer.step()
    assert torch.allclose(model.backbone.conv1.weight, conv * (1 - args.lr * 0.05))
    assert torch.equal(model.backbone.bn1.weight, bn) and torch.equal(crit.proxies, proxies)


def test_every_real_photos_variant_is_a_valid_train_command():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "real_photos", Path(train.__file__).parent / "bench" / "real_photos.py"
    )
    real_photos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_photos)
    assert real_photos.VARIANTS["adamw"][:2] == ["--optimizer", "adamw"]
    for name, extra in real_photos.VARIANTS.items():
        args = parse(["--weights", "imagenet", *extra])
        assert arg_checks.check_args(args) == [], name


@pytest.mark.slow
def test_resume_with_another_optimizer_is_refused_with_the_way_out(tiny_sop, tmp_path, capsys):
    argv = tiny_argv(tiny_sop, tmp_path, "--epochs", "1", "--projector_samples", "0")
    train.main(parse(argv + ["--optimizer", "adamw"]))
    assert train.cli(argv + ["--epochs", "2", "--resume", "auto"]) == 1
    err = capsys.readouterr().err
    assert "another --optimizer" in err and "backbone_no_decay" in err
    assert train.cli(argv + ["--epochs", "2", "--resume", "auto", "--optimizer", "adamw"]) == 0


def test_warmup_steps_round_fractional_epochs():
    assert loop.warmup_steps(0, 17) == 0
    assert loop.warmup_steps(0.5, 17) == 8 and loop.warmup_steps(1.0, 17) == 17
    assert loop.warmup_steps(2.5, 4) == 10


# ============ warm-up and frozen BatchNorm, end to end ============


@pytest.mark.slow
def test_warmup_trains_the_head_only_then_the_backbone(tiny_sop, tmp_path):
    start = tmp_path / "start"
    train.main(parse(tiny_argv(tiny_sop, start, "--epochs", "0", "--projector_samples", "0")))
    initial = ckpt(start)
    warm = tmp_path / "warm"
    train.main(parse(tiny_argv(tiny_sop, warm, "--warmup_epochs", "1", "--epochs", "1", "--projector_samples", "0")))
    after = ckpt(warm)
    # backbone untouched (weights and BatchNorm statistics), head trained
    for k, v in backbone_state(initial).items():
        assert torch.equal(v, after["model"][k]), k
    assert not torch.equal(initial["model"]["head.0.weight"], after["model"]["head.0.weight"])
    rows = read_rows(warm / "runs" / "t" / "metrics.csv")
    assert float(rows[1]["train_frozen_steps"]) == 2.0
    # half an epoch: 1 of 2 steps frozen in epoch 1, then the backbone trains
    half = tmp_path / "half"
    train.main(parse(tiny_argv(tiny_sop, half, "--warmup_epochs", "0.5", "--epochs", "2", "--projector_samples", "0")))
    rows = read_rows(half / "runs" / "t" / "metrics.csv")
    assert [float(r["train_frozen_steps"]) for r in rows[1:]] == [1.0, 0.0]
    moved = ckpt(half)
    assert any(not torch.equal(v, moved["model"][k]) for k, v in backbone_state(initial).items() if not is_bn_stat(k))
    # the zero-shot row is that of the initial backbone (the warm run's backbone did not move)
    assert rows[0]["val_zero_shot_map@r"] != "" and rows[0]["val_zero_shot_recall@1"] != ""


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_keeps_the_running_statistics(tiny_sop, tmp_path, freeze):
    start = tmp_path / "start"
    train.main(parse(tiny_argv(tiny_sop, start, "--epochs", "0", "--projector_samples", "0")))
    initial = backbone_state(ckpt(start))
    out = tmp_path / "run"
    train.main(
        parse(
            tiny_argv(
                tiny_sop,
                out,
                "--epochs",
                "1",
                "--projector_samples",
                "0",
                "--freeze_bn" if freeze else "--no-freeze_bn",
            )
        )
    )
    after = ckpt(out)["model"]
    stats = [k for k in initial if k.endswith("running_mean")]
    weights = [k for k in initial if k.endswith("conv1.weight")]
    assert stats and weights
    assert all(torch.equal(initial[k], after[k]) for k in stats) == freeze
    assert not any(torch.equal(initial[k], after[k]) for k in weights)  # the weights train anyway


# ============ PCA head initialisation ============


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_pca_head_init_in_train(tiny_sop, tmp_path, head, capsys):
    train.main(
        parse(
            tiny_argv(
                tiny_sop,
                tmp_path,
                "--epochs",
                "0",
                "--projector_samples",
                "0",
                "--head",
                head,
                "--head_init",
                "pca",
                "--embedding_size",
                "16",
                "--dropout",
                "0",
            )
        )
    )
    assert "head initialised with the PCA of" in capsys.readouterr().out
    state = ckpt(tmp_path)["model"]
    w = state["head.1.weight"] if head == "linear" else state["head.0.weight"][:16]
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-4)  # orthonormal principal directions
    # At epoch 0 the headed network ranks the validation images as the PCA projection does.
    model = models.load_model(tmp_path / "checkpoints" / "t" / "last.pth")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f = model.backbone(x)
        bias = state["head.1.bias"] if head == "linear" else state["head.0.bias"][:16]
        assert torch.allclose(model(x), torch.nn.functional.normalize(f @ w.T + bias, dim=1), atol=1e-4)


# ============ Proxy-Anchor, select_metric, zero-shot row ============


@pytest.mark.slow
def test_proxy_anchor_trains_resumes_and_selects_on_map_r(tiny_sop, tmp_path):
    argv = tiny_argv(
        tiny_sop,
        tmp_path,
        "--loss",
        "proxy_anchor",
        "--head",
        "linear",
        "--epochs",
        "1",
        "--projector_samples",
        "0",
        "--select_metric",
        "map@r",
    )
    train.main(parse(argv))
    first = ckpt(tmp_path)
    assert first["criterion"]["proxies"].shape == (28, 128)  # one proxy per training product
    train.main(parse(argv + ["--epochs", "3", "--resume", "auto"]))
    rows = read_rows(tmp_path / "runs" / "t" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert "val_loss" not in rows[0]  # no proxies for validation products: no validation loss
    maps = [float(r["val_map@r"]) for r in rows]
    best = ckpt(tmp_path, "best.pth")
    assert best["epoch"] == maps.index(max(maps))  # first epoch reaching the best MAP@R
    assert best["select_metric"] == "map@r" and best["best_score"] == max(maps)


def test_zero_shot_row_equals_the_backbone_alone(tiny_sop, tmp_path):
    train.main(parse(tiny_argv(tiny_sop, tmp_path, "--epochs", "0", "--projector_samples", "0")))
    row = read_rows(tmp_path / "runs" / "t" / "metrics.csv")[0]
    model = models.load_model(tmp_path / "checkpoints" / "t" / "last.pth")
    import datasets
    import preprocessing

    val = datasets.SOPDataset(tiny_sop, "val", transform=preprocessing.build_transform(32, train=False))
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    emb, _ = extraction.extract_embeddings(model.zero_shot(), loader, progress=False)
    assert emb.shape[1] == 512
    expected = retrieval.evaluate_embeddings(emb, val.class_ids, val.super_ids)["product"]
    assert float(row["val_zero_shot_map@r"]) == pytest.approx(expected["map@r"], abs=1e-6)
    assert float(row["val_zero_shot_recall@1"]) == pytest.approx(expected["recall@1"], abs=1e-6)
    assert np.isfinite(float(row["val_map@r"]))
