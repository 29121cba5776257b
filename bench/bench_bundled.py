"""
The bundled model on this machine: wall time of one variant's default evaluation (N samples x
DDIM steps) in full precision and with W8A8 fake quantization (per-channel weights, per-tensor
dynamic activations: the cost every method's variant pays), and FID over seeds against the
committed CIFAR-10-fragment statistics when the Inception weights are cached.

    python bench/bench_bundled.py                                   # the quick preset, 2 seeds
    python bench/bench_bundled.py --n 1000 --steps 100 --seeds 0 --no-quant   # the README's one-off FID
    python bench/bench_bundled.py --floor                           # FID of the fragment's test images
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (QuantConv2d, QuantLinear, Quantizer, ddim_sample, ddim_timesteps, fake_quant,
                    linear_alphas_cumprod, minmax_range, parse_config, qrange, quant_params, replace_modules,
                    run_main, set_quant)
from models.ddpm import load_unet

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    """Time (and score) the bundled model's default evaluation."""
    n: int = 256                  # samples per variant (the methods' quick preset)
    steps: int = 20               # DDIM steps (quad; the methods' quick preset)
    seeds: str = "0,1"            # comma-separated seeds of the starting noise
    batch: int = 256              # images per forward
    quant: bool = True            # also time a W8A8 fake-quant copy
    fid: bool = True              # FID against --ref when the Inception weights are cached
    floor: bool = False           # only: FID of the fragment's test images against --ref
    ref: str = os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")  # reference statistics
    data: str = os.path.join(HERE, "..", "shared", "assets", "cifar10-fragment.npz")  # for --floor


class DynamicQuantizer(nn.Module):
    """Per-tensor fake quantization with the min-max range of each call's input (asymmetric, 0 kept in
    the range), computed anew at every call: the dynamic mode that common.Quantizer used to have."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def forward(self, x):
        rows = x.reshape(1, -1)                                     # the whole tensor as one row
        delta, zero = quant_params(*minmax_range(rows), self.bits, symmetric=False, include_zero=True)
        return fake_quant(rows, delta, zero, *qrange(self.bits, False)).reshape(x.shape)


def w8a8(net):
    make = lambda name, m: (QuantLinear if isinstance(m, nn.Linear) else QuantConv2d).from_float(
        m, Quantizer(8, "channel"), DynamicQuantizer(8))
    replace_modules(net, lambda name, m: isinstance(m, (nn.Linear, nn.Conv2d)), make)
    for m in net.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m.wq.set_range(*minmax_range(m.wq.rows(m.weight)))
    set_quant(net, True, True)
    return net


def fid(images, cfg):
    try:
        import eval_fid
        return eval_fid.fid_to_reference(images, cfg.ref)["fid"]
    except Exception as e:  # no weights cached: report, don't fail the timing
        print(f"  (FID skipped: {str(e).splitlines()[0]})")
        return None


def main():
    cfg = parse_config(Config)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if cfg.floor:
        with np.load(cfg.data) as z:
            print(f"floor: FID(fragment test images, {z['test_images'].shape[0]}) = "
                  f"{fid(z['test_images'], cfg)}")
        return
    variants = {"fp32": load_unet("ddpm-cifar10-small")}
    if cfg.quant:
        variants["w8a8 fake-quant"] = w8a8(load_unet("ddpm-cifar10-small"))
    seq, abar = ddim_timesteps("quad", cfg.steps), linear_alphas_cumprod()
    print(f"{torch.get_num_threads()} threads; N = {cfg.n}, DDIM-{cfg.steps} quad")
    for name, net in variants.items():
        for seed in map(int, cfg.seeds.split(",")):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(cfg.n, 3, 32, 32, generator=g)
            t0 = time.time()
            out = torch.cat([ddim_sample(net, xb, seq, abar) for xb in x.split(cfg.batch)])
            sec = time.time() - t0
            score = fid(out, cfg) if cfg.fid else None
            print(f"{name:16s} seed {seed}: {sec:6.1f} s sampling ({cfg.n * cfg.steps / sec:5.0f} forwards/s)"
                  + (f", FID {score:.2f}" if score is not None else ""))


if __name__ == "__main__":
    run_main(main)
