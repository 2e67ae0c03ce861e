"""A few training steps of a tiny Llama with fused_softmax attention beside the same model under
transformers' eager attention: same initial weights, same batches, same seed, so the losses agree
step by step. On a GPU it also prints each step's time (the first one includes Triton's compilation).

    python examples/train_tiny_llama.py                   # CPU: fused_softmax's eager-PyTorch fallback
    python examples/train_tiny_llama.py --backend triton  # the Triton kernels (on CPU: TRITON_INTERPRET=1)
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fused_softmax
from fused_softmax.integrations import transformers as fused_transformers

VOCAB, BATCH, LENGTH = 128, 8, 64


def tiny_llama(attn_implementation, device):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).to(device)


def counting_batch(generator, device):
    """Sequences that count up from a random start: a pattern the model picks up in a few steps."""
    start = torch.randint(VOCAB, (BATCH, 1), generator=generator)
    return ((start + torch.arange(LENGTH)) % VOCAB).to(device)


def timed_step(model, optimizer, ids):
    """One optimizer step; returns the loss and the seconds it took."""
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if ids.is_cuda:
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto", help="fused_softmax backend")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused_transformers.register()
    torch.manual_seed(0)
    eager = tiny_llama("eager", device)
    fused = tiny_llama("fused_softmax", device)
    fused.load_state_dict(eager.state_dict())
    eager_optimizer = torch.optim.AdamW(eager.parameters(), lr=3e-3)
    fused_optimizer = torch.optim.AdamW(fused.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    print(f"{device}, fused_softmax backend {args.backend!r}")
    print("step  eager loss  fused loss" + ("  eager ms  fused ms" if device == "cuda" else ""))
    for step in range(args.steps):
        ids = counting_batch(generator, device)
        eager_loss, eager_s = timed_step(eager, eager_optimizer, ids)
        with fused_softmax.use_backend(args.backend):
            fused_loss, fused_s = timed_step(fused, fused_optimizer, ids)
        times = f"  {eager_s * 1e3:8.2f}  {fused_s * 1e3:8.2f}" if device == "cuda" else ""
        print(f"{step:4d}  {eager_loss:10.6f}  {fused_loss:10.6f}{times}")


if __name__ == "__main__":
    main()
