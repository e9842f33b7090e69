"""Partial FC (train/partial_fc.py) against one process's full classifier, in float64.

Two gloo processes with unequal batches (3 and 2 rows, padded to 4) and unequal shards
(41 classes: 21 and 20 rows): the loss, each shard's gradient and the embeddings' gradient
must be those of models.build_head's full head on the global batch, for every head kind.
With ``sample_rate < 1`` the scored classes hold every positive, have the documented
count, and the loss is the full head's over those classes. In the trainer, two processes
with a partial FC (stopped and resumed once) train as one process with the full head.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models import build_head
from test_train import _free_port, _without_batchnorm, tiny
from train import distributed
from train.checkpoint import load_checkpoint
from train.config import config_from_dict
from train.partial_fc import PartialFC
from train.trainer import Trainer

KINDS = ("softmax", "cosface", "arcface")
CLASSES, DIM, MAX_BATCH = 41, 5, 4
SHARDS = ((0, 21), (21, 20))  # (first class, rows) per rank
SPLIT = (3, 2)  # rows per rank


def _inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(sum(SPLIT), DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (sum(SPLIT),), generator=generator)
    weight = torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64)
    bias = torch.randn(CLASSES, generator=generator, dtype=torch.float64)
    return embedding, labels, weight, bias


def _partial(kind, rank, world, sample_rate=1.0, weight=None, bias=None):
    head = PartialFC(kind, DIM, CLASSES, s=3.0, sample_rate=sample_rate, max_batch=MAX_BATCH,
                     rank=rank, world_size=world, group=dist.group.WORLD if world > 1 else None)
    head = head.double()
    if weight is not None:
        with torch.no_grad():
            head.weight.copy_(head.shard_rows(weight))
            if head.bias is not None:
                head.bias.copy_(head.shard_rows(bias))
    return head


def _run(head, embedding, labels):
    local = embedding.clone().requires_grad_()
    loss, correct = head(local, labels)
    loss.backward()
    grads = (head.weight.grad, head.bias.grad if head.bias is not None else None)
    return loss.detach(), correct, local.grad, grads


def _full(kind, embedding, labels, weight, bias, classes=None):
    """The full head's loss, gradients and correct count, over ``classes`` (default all)."""
    classes = torch.arange(CLASSES) if classes is None else classes
    head = build_head(kind, DIM, len(classes), s=3.0).double()
    with torch.no_grad():
        if kind == "softmax":
            head.fc.weight.copy_(weight[classes])
            head.fc.bias.copy_(bias[classes])
        else:
            head.weight.copy_(weight[classes])
    target = torch.searchsorted(classes, labels)
    embedding = embedding.clone().requires_grad_()
    logits = head(embedding, target)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    params = (head.fc.weight, head.fc.bias) if kind == "softmax" else (head.weight,)
    full_grads = [torch.zeros(CLASSES, *p.shape[1:], dtype=p.dtype).index_copy(0, classes, p.grad)
                  for p in params]
    correct = (logits.argmax(1) == target)
    return loss.detach(), embedding.grad, full_grads, correct


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        start = sum(SPLIT[:rank])
        for seed, kind in enumerate(KINDS):
            embedding, labels, weight, bias = _inputs(seed)
            rows = slice(start, start + SPLIT[rank])
            for sample_rate in (1.0, 0.5):
                head = _partial(kind, rank, world, sample_rate, weight, bias)
                # The same draw twice: once to see the sampled rows, once in forward.
                torch.manual_seed(100 + seed)
                gathered = torch.cat([F.pad(part, (0, MAX_BATCH - len(part)), value=-1)
                                      for part in labels.split(SPLIT)])
                sampled, _ = head.sample(gathered)
                sampled = torch.arange(head.num_local) if sampled is None else sampled
                torch.manual_seed(100 + seed)
                results[(rank, kind, sample_rate)] = (
                    _run(head, embedding[rows], labels[rows]),
                    sampled + head.class_start, head.num_sample)
    finally:
        dist.destroy_process_group()


def _check(kind, got, expected, world, rows):
    loss, correct, embedding_grad, (weight_grad, bias_grad), start, local = got
    full_loss, full_embedding_grad, full_grads, full_correct = expected
    torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=1e-14)
    # DDP averages the backbone gradient over the ranks: each rank gets world x its part.
    torch.testing.assert_close(embedding_grad / world, full_embedding_grad[rows], rtol=1e-10,
                               atol=1e-14)
    torch.testing.assert_close(weight_grad, full_grads[0][start:start + local], rtol=1e-10,
                               atol=1e-14)
    if kind == "softmax":
        torch.testing.assert_close(bias_grad, full_grads[1][start:start + local], rtol=1e-10,
                                   atol=1e-14)
    assert correct.item() == full_correct[rows].sum().item()


def test_two_processes_equal_the_full_classifier():
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    for seed, kind in enumerate(KINDS):
        embedding, labels, weight, bias = _inputs(seed)
        for sample_rate in (1.0, 0.5):
            got = [results[(rank, kind, sample_rate)] for rank in range(world)]
            scored = torch.cat([sampled for _, sampled, _ in got])
            # Every class of the global batch is scored, and the counts are as documented.
            assert set(labels.tolist()) <= set(scored.tolist())
            for rank, (_, sampled, count) in enumerate(got):
                local = SHARDS[rank][1]
                expected_count = min(local, max(math.ceil(sample_rate * local), world * MAX_BATCH))
                assert count == expected_count == len(sampled) == len(set(sampled.tolist()))
                assert count < local or sample_rate == 1  # 0.5 does leave classes out
            expected = _full(kind, embedding, labels, weight, bias, scored.sort().values)
            for rank in range(world):
                start, local = SHARDS[rank]
                rows = slice(sum(SPLIT[:rank]), sum(SPLIT[:rank + 1]))
                _check(kind, (*got[rank][0], start, local), expected, world, rows)


@pytest.mark.parametrize("kind", KINDS)
def test_one_process_equals_the_full_classifier(kind):
    embedding, labels, weight, bias = _inputs(7)
    head = _partial(kind, 0, 1, 1.0, weight, bias)
    expected = _full(kind, embedding, labels, weight, bias)
    _check(kind, (*_run(head, embedding, labels), 0, CLASSES), expected, 1, slice(None))


def test_sampling_keeps_every_positive_at_a_fixed_count():
    head = PartialFC("arcface", 8, 1000, sample_rate=0.1, max_batch=16)
    assert head.num_sample == 100
    for seed in range(5):
        torch.manual_seed(seed)
        labels = torch.randint(0, 1000, (16,))
        labels[3] = -1  # padding: never a positive
        rows, target = head.sample(labels)
        assert len(rows) == 100 and torch.equal(rows, rows.unique())
        assert set(labels[labels >= 0].tolist()) <= set(rows.tolist())
        assert torch.equal(rows[target[labels >= 0]], labels[labels >= 0])
        assert target[3] == -1
    # A batch larger than the sampled share: the count grows to hold every positive.
    assert PartialFC("cosface", 8, 1000, sample_rate=0.01, max_batch=64).num_sample == 64
    assert PartialFC("cosface", 8, 1000, sample_rate=1.0, max_batch=64).num_sample == 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC("arcface", 8, 10, sample_rate=0.0, max_batch=4)
    with pytest.raises(ValueError, match="kind"):
        PartialFC("sphereface", 8, 10, max_batch=4)
    with pytest.raises(ValueError, match="at least one"):
        PartialFC("arcface", 8, 3, max_batch=4, rank=0, world_size=4)


# ------------------------------------------------------------------ in the trainer


def _run_trainer(config, head_weight=None, head_bias=None):
    """A Trainer run in this process's group, its head first set to the given rows."""
    ctx = distributed.setup("cpu")
    try:
        trainer = Trainer(config_from_dict(config), ctx)
        head = trainer.module.head
        if head_weight is not None:
            with torch.no_grad():
                if isinstance(head, PartialFC):
                    head.weight.copy_(head.shard_rows(head_weight))
                    head.bias.copy_(head.shard_rows(head_bias))
                else:
                    head.fc.weight.copy_(head_weight)
                    head.fc.bias.copy_(head_bias)
        trainer.run()
    finally:
        distributed.teardown(ctx)


def _trainer_worker(rank, world, port, config, head_weight, head_bias):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _without_batchnorm()
    _run_trainer(config, head_weight, head_bias)


def test_trainer_on_two_processes_equals_one_process_with_the_full_head(tmp_path, monkeypatch):
    # As test_train's DDP test: no BatchNorm or flips, so that two processes of 4 images
    # must train as one process of 8. Here the head is a partial FC split over the two,
    # stopped after 2 of the 3 steps and resumed from the checkpoint it gathered.
    _without_batchnorm(monkeypatch)
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(4, 16, generator=generator) * 0.3, torch.randn(4, generator=generator)
    sections = dict(model={"batch_norm": False}, data={"flip": False}, optim={"lr": 0.01},
                    ecloss={"estimator": "marginal"}, train={"epochs": 1, "deterministic": False})
    one = tiny(tmp_path, "one", **sections)
    one["train"]["batch_size"] = 8
    _run_trainer(one, weight, bias)
    two = tiny(tmp_path, "two", **sections, head={"partial_fc": True})
    stopped = {**two, "train": {**two["train"], "stop_at_step": 2}}
    mp.spawn(_trainer_worker, args=(2, _free_port(), stopped, weight, bias), nprocs=2, join=True)
    assert load_checkpoint(tmp_path / "two")["step"] == 2
    resumed = {**two, "train": {**two["train"], "resume": str(tmp_path / "two")}}
    mp.spawn(_trainer_worker, args=(2, _free_port(), resumed, None, None), nprocs=2, join=True)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a["step"] == b["step"] == 3 and b["world_size"] == 2
    # The checkpoint holds the whole classifier and its momentum, in class order.
    assert b["head"]["weight"].shape == (4, 16)
    pairs = [(a["head"]["fc.weight"], b["head"]["weight"]), (a["head"]["fc.bias"], b["head"]["bias"])]
    pairs += [(a["model"][key], b["model"][key]) for key in a["model"]]
    pairs += [(a["optimizer"]["state"][i]["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
              for i in a["optimizer"]["state"]]
    # float32 in another summation order: they agree to 1e-2 of the head's update.
    moved = torch.cat([(x - y).flatten() for x, y in pairs]).norm()
    update = (a["head"]["fc.weight"] - weight).norm()
    assert update > 1e-3 and moved < 1e-2 * update, (moved, update)
    # The gathered checkpoint resumes on one process too: every row and its momentum.
    alone = {**two, "train": {**two["train"], "epochs": 2, "resume": str(tmp_path / "two")}}
    trainer = Trainer(config_from_dict(alone), distributed.setup("cpu"))
    head, index = trainer.module.head, len(list(trainer.module.backbone.parameters()))
    assert head.num_local == 4 and torch.equal(head.weight.detach(), b["head"]["weight"])
    assert torch.equal(trainer.optimizer.state[head.weight]["momentum_buffer"],
                       b["optimizer"]["state"][index]["momentum_buffer"])
    trainer.close()
