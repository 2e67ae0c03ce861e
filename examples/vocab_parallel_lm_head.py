"""A vocab-parallel LM head: the output projection's rows (one per vocabulary entry) are split
across processes, each computes the logits of its slice of the vocabulary, and
fused_softmax.distributed.cross_entropy gives the loss without ever gathering the logits.
The loss and every gradient match the unsharded head's.

Runs on one CPU machine: it spawns 2 processes talking over gloo on the loopback interface.

    python examples/vocab_parallel_lm_head.py
"""

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fused_softmax.distributed

WORLD_SIZE, TOKENS, HIDDEN, VOCAB = 2, 16, 32, 1000


def train_step(rank, world_size, port):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)  # the same model and batch on every rank
        head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
        target = torch.randint(VOCAB, (TOKENS,))
        target[:3] = -100  # padding: ignored

        # This rank's shard of the head: a column-parallel Linear, VOCAB / world_size outputs.
        shard = torch.nn.Linear(HIDDEN, VOCAB // world_size, bias=False)
        with torch.no_grad():
            shard.weight.copy_(head.weight.chunk(world_size)[rank])
        local_hidden = hidden.detach().requires_grad_()
        loss = fused_softmax.distributed.cross_entropy(shard(local_hidden), target, label_smoothing=0.1)
        loss.backward()
        # The hidden states feed every shard's logits: their gradient is the sum of the ranks' parts.
        dist.all_reduce(local_hidden.grad)

        reference = F.cross_entropy(head(hidden), target, label_smoothing=0.1)
        reference.backward()
        torch.testing.assert_close(loss, reference)
        torch.testing.assert_close(shard.weight.grad, head.weight.grad.chunk(world_size)[rank])
        torch.testing.assert_close(local_hidden.grad, hidden.grad)
        if rank == 0:
            print(
                f"loss {loss.item():.6f} on {world_size} vocab shards, {reference.item():.6f} unsharded; "
                "gradients match"
            )
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(train_step, args=(WORLD_SIZE, free_port()), nprocs=WORLD_SIZE)
