"""The anchor drift term at a 7B-like width, on synthetic activations (CPU here; a GPU when one is lent).

    .venv/bin/python bench/bench_regularizer_width.py [--width 4096] [--rows 2304] [--anchors 1024]
        [--layers 4] [--repeats 3] [--device cpu]

What a step of a 7B LLaVA-like model adds with ``AnchorDriftLoss`` (mode ``fixed``, the default kernel
mixture of 5 bandwidths): per anchored layer, the unbiased MMD^2 between the batch's visual tokens
(``--rows``, e.g. 4 images x 576 tokens) and ``--anchors`` anchor tokens, forward and backward to the
visual states. Beside it, on the same rows and device, the forward and backward of one decoder layer's
dense work at that width (the attention projections q, k, v, o at ``width x width`` and a SwiGLU MLP at
``width x 11008``, as in Llama-2-7B), so the term reads as a fraction of one layer of the model it
regularizes. Synthetic data: the cost does not depend on the values. Prints a markdown table for
bench/RESULTS.md; the device is named in it.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--rows", type=int, default=2304, help="visual tokens per batch (default 4 x 576)")
    ap.add_argument("--anchors", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from driftlens.train.anchor import AnchorDriftLoss

    dev, d = args.device, args.width
    gen = torch.Generator().manual_seed(0)
    anchors = {la: torch.randn(args.anchors, d, generator=gen).to(dev) for la in range(args.layers)}
    loss_fn = AnchorDriftLoss(anchors, mode="fixed").to(dev)
    visual = {la: (torch.randn(args.rows, d, generator=gen) + 0.1).to(dev).requires_grad_(True)
              for la in range(args.layers)}

    def term():
        loss = loss_fn(visual)
        loss.backward()
        for v in visual.values():
            v.grad = None

    x = torch.randn(args.rows, d, generator=gen).to(dev).requires_grad_(True)
    attn = [torch.nn.Linear(d, d, bias=False).to(dev) for _ in range(4)]
    gate, up = torch.nn.Linear(d, args.mlp, bias=False).to(dev), torch.nn.Linear(d, args.mlp, bias=False).to(dev)
    down = torch.nn.Linear(args.mlp, d, bias=False).to(dev)

    def layer():
        h = sum(p(x) for p in attn)
        y = down(torch.nn.functional.silu(gate(h)) * up(h))
        y.sum().backward()
        x.grad = None
        for m in (*attn, gate, up, down):
            m.weight.grad = None

    t_term = _timed(term, args.repeats, dev)
    t_layer = _timed(layer, args.repeats, dev)
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"\nDevice {dev} ({name}), torch threads {torch.get_num_threads()}, width {d}, {args.rows} visual rows, "
          f"{args.anchors} anchors, {args.layers} anchored layers, fp32, median of {args.repeats}\n")
    print("| work | seconds | relative to one decoder layer's dense work |")
    print("|---|---|---|")
    print(f"| anchor term, {args.layers} layers, forward + backward | {t_term:.3f} | {t_term / t_layer:.2f}x |")
    print(f"| anchor term per layer | {t_term / args.layers:.3f} | {t_term / args.layers / t_layer:.2f}x |")
    print(f"| one decoder layer's projections + MLP, forward + backward (same rows) | {t_layer:.3f} | 1.00x |")


if __name__ == "__main__":
    main()
