"""What folding batch norm into the convolutions (``models.fold_batch_norm``) saves: the base network's forward pass
(CERTIFY's work) and forward + input gradient (the smoothing attack's step), original against folded, timed
interleaved on this device (``timing.timed_interleaved``: best of --repeat).

    python scripts/bench_inference.py                      # smooth-sigma0.25, batch 1000
    python scripts/bench_inference.py --model smooth-sigma0.50 --batch 400 --repeat 7
"""

from __future__ import annotations

import argparse

import torch

from shadowlab import checkpoints
from shadowlab.models import default_device, fold_batch_norm
from shadowlab.timing import timed_interleaved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smooth-sigma0.25")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    dev = default_device()
    model, _ = checkpoints.load(a.model, device=dev)
    model.eval()
    folded = fold_batch_norm(model)
    x = torch.rand(a.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        diff = (model(x) - folded(x)).abs().max().item()
        agree = (model(x).argmax(1) == folded(x).argmax(1)).float().mean().item()

    def grad(net: torch.nn.Module) -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(net(xi).logsumexp(1).sum(), xi)

    def forward(net: torch.nn.Module) -> None:
        with torch.inference_mode():
            net(x)

    t = timed_interleaved({"forward": lambda: forward(model), "forward folded": lambda: forward(folded),
                           "gradient": lambda: grad(model), "gradient folded": lambda: grad(folded)},
                          dev, repeat=a.repeat, warmup=1)
    print(f"{a.model} on {dev}, batch {a.batch}, {torch.get_num_threads()} threads; folded logits within "
          f"{diff:.1e} of the original, argmax agreeing on {100 * agree:.1f}% of the batch")
    for kind in ("forward", "gradient"):
        base, fold = t[kind], t[f"{kind} folded"]
        print(f"{kind:9s} {1e3 * base / a.batch:.3f} ms/image -> folded {1e3 * fold / a.batch:.3f} ms/image "
              f"({100 * (1 - fold / base):.0f}% less)")


if __name__ == "__main__":
    main()
