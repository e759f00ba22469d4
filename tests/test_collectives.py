"""Collectives that NCCL accepts: the process group of a CUDA run has a backend for CPU tensors too
(``cpu:gloo,cuda:nccl``); every collective of a training run (epoch statistics, the loss check,
proxies' gradients, gathered embeddings, the validation score) goes through training.distributed,
which puts its tensor on the process's device (NCCL takes CUDA tensors only: a CPU tensor handed
to a NCCL-only group crashed torchrun at the first epoch end).

The end-to-end check runs train.py in one process that believes it has 2 ranks: a real 1-process
gloo group serves DistributedDataParallel, and torch.distributed's collectives are replaced by
recorders that act as an identical second rank would, and note who called them with which
tensors.
"""

import gc
import sys
import weakref

import pytest
from support import parse, tiny_argv
import torch
import torch.distributed as dist

import train
from training import distributed

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
    ),
]


def _as_second_rank(name, args, kwargs):
    """What an identical second rank makes of the collective (in place, as torch does)."""
    if name == "all_reduce":
        args[0].mul_(2)  # sum of two equal tensors
    elif name == "all_gather":
        for part in args[0]:
            part.copy_(args[1])


def record_collectives(monkeypatch, calls):
    """Replace torch.distributed's collectives by recorders: (name, calling module, tensors)."""
    for name in (
        "all_reduce",
        "broadcast",
        "all_gather",
        "all_gather_into_tensor",
        "reduce",
        "reduce_scatter",
        "all_gather_object",
        "broadcast_object_list",
        "barrier",
    ):

        def recorder(*args, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            tensors = [
                t
                for a in (*args, *kwargs.values())
                for t in (a if isinstance(a, (list, tuple)) else [a])
                if torch.is_tensor(t)
            ]
            calls.append((_name, caller, tensors))
            _as_second_rank(_name, args, kwargs)

        monkeypatch.setattr(dist, name, recorder)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["triplet", "proxy_anchor"])
def test_every_collective_of_a_run_goes_through_the_owner_on_the_run_device(
    tiny_sop, tmp_path, monkeypatch, one_process_group, loss
):
    calls = []
    record_collectives(monkeypatch, calls)
    monkeypatch.setattr(distributed, "init_distributed", lambda device_arg: (0, 2, 0))
    devices = []
    process_of = distributed.Process.of
    monkeypatch.setattr(distributed.Process, "of", lambda *a: devices.append(process_of(*a)) or devices[-1])
    argv = tiny_argv(
        tiny_sop,
        tmp_path,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--projector_samples",
        "0",
        "--loss",
        loss,
        "--gather_embeddings",
        "--warmup_epochs",
        "0.5",
    )
    train.main(parse(argv))
    assert devices and devices[0].world == 2
    names = {name for name, _, _ in calls}
    # loss check, proxies, epoch statistics, gathered batch, validation score, barriers
    assert {"all_reduce", "broadcast", "all_gather", "barrier"} <= names
    wrong = [(name, caller) for name, caller, _ in calls if caller != distributed.__name__]
    assert not wrong, f"collectives called outside training.distributed: {wrong}"
    elsewhere = [(name, t.device) for name, _, tensors in calls for t in tensors if t.device != devices[0].device]
    assert not elsewhere, f"collectives given tensors off the run's device {devices[0].device}: {elsewhere}"


def test_the_owner_moves_tensors_to_the_process_device(monkeypatch):
    """A device other than the tensor's (``meta`` stands in for CUDA on a CPU-only machine): the
    collective gets the tensor on that device, and the caller's tensor is left as it was."""
    calls = []
    record_collectives(monkeypatch, calls)
    meta = torch.device("meta")
    values = torch.ones(3)
    assert distributed.all_reduce_sum(values, meta, world=2).device == meta
    assert distributed.broadcast(values, meta, world=2).device == meta
    assert [(name, tensors[0].device) for name, _, tensors in calls] == [("all_reduce", meta), ("broadcast", meta)]
    assert torch.equal(values, torch.ones(3))
    assert distributed.all_reduce_sum(values, torch.device("cpu"), world=2).tolist() == [2.0, 2.0, 2.0]


def test_a_cuda_run_creates_its_group_for_cpu_and_cuda_tensors(monkeypatch):
    created = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: created.append(backend))
    assert distributed.init_distributed("auto") == (1, 2, 1)
    assert distributed.init_distributed("cpu") == (1, 2, 1)
    assert created == ["cpu:gloo,cuda:nccl", "gloo"]


def test_average_gradients_is_one_mean_over_the_ranks(monkeypatch):
    calls = []
    record_collectives(monkeypatch, calls)
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.full((2, 2), 3.0)  # b has no gradient: it counts as zeros
    distributed.average_gradients([a, b], torch.device("cpu"), world=2, scale=0.5)
    assert len(calls) == 1  # one collective for every parameter
    assert torch.equal(a.grad, torch.full((2, 2), 1.5)) and torch.equal(b.grad, torch.zeros(3))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def steps(module, n=2):
    for _ in range(n):
        module(torch.randn(3, 4)).sum().backward()


def test_replicas_rebuild_ddp_when_the_trained_parameters_change(one_process_group):
    """DDP waits for the gradients of the parameters that required them when it was built: a
    frozen backbone's never come, and without find_unused_parameters the second step fails.
    Replicas builds one DDP per phase instead."""
    net = Net()
    stale = torch.nn.parallel.DistributedDataParallel(net)  # built while everything trains
    net.backbone.requires_grad_(False)
    with pytest.raises(RuntimeError, match="finished reduction"):
        steps(stale)
    replicas = distributed.Replicas(Net(), world=2, device=torch.device("cpu"))
    replicas.model.backbone.requires_grad_(False)
    warmup = replicas.module()
    steps(warmup)
    assert replicas.module() is warmup  # same phase, same DDP
    replicas.model.backbone.requires_grad_(True)
    tuned = replicas.module()
    assert tuned is not warmup and tuned.find_unused_parameters is False
    # the warm-up's DDP is freed with its gradient hooks: it reduces nothing any more
    freed, warmup = weakref.ref(warmup), None
    gc.collect()
    assert freed() is None
    steps(tuned)
    assert replicas.model.backbone.weight.grad is not None
    assert distributed.Replicas(net, world=1, device=torch.device("cpu")).module() is net
