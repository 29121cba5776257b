"""
Cost of DilateQuant's BKD on the paper's full-size CIFAR-10 UNet (35.7 M parameters, random weights:
the cost does not depend on the values): seconds per distillation iteration of every block at the
paper's batch size, peak memory, and the full schedule extrapolated (calibration trajectories,
per-block caching, 5,000 iterations per block), next to the paper's 1.08 h / 3,439 MB (one RTX A6000).

    python bench/bench_dilatequant.py                     # CPU or the GPU if there is one
    python bench/bench_dilatequant.py --iters 20 --device cuda
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dilatequant as dq
from common import parse_config, peak_mb, pick_device, run_main
from models.ddpm import CONFIGS, UNet


@dataclass
class Config:
    """Time DilateQuant's block-wise distillation on the full-size DDPM CIFAR-10 UNet."""
    iters: int = 3                # timed iterations per block (after one warm-up iteration)
    batch: int = 32               # BKD batch (paper: 32)
    bits: int = 4                 # W and A bits
    steps: int = 100              # TPQ rows = DDIM steps (paper: 100)
    calib: int = 5120             # calibration samples of the full schedule (paper: 5120)
    calib_traj: int = 256         # FP trajectories behind them (dilatequant.py's paper preset)
    paper_iters: int = 5000       # iterations per block of the full schedule (paper: 5000)
    device: str = "auto"          # auto, cpu or cuda


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size_unet(batch, steps, device):
    """The full-size UNet with random weights, one batch of random calibration inputs (x_t, t, step index),
    a generator for what else is random, and the seconds of one FP forward per image (after a warm-up):
    the unit of the trajectory and caching costs."""
    torch.manual_seed(0)
    fp = UNet(**CONFIGS["ddpm-cifar10"]).eval().requires_grad_(False).to(device)
    example = (torch.zeros(1, 3, 32, 32, device=device), torch.zeros(1, device=device))
    g = torch.Generator().manual_seed(0)
    calib = dict(x=torch.randn(batch, 3, 32, 32, generator=g).to(device),
                 t=torch.randint(1000, (batch,), generator=g).float().to(device),
                 idx=torch.randint(steps, (batch,), generator=g).to(device))
    with torch.no_grad():
        for _ in range(2):                                  # the second forward is the timed one
            sync(device)
            t0 = time.time()
            fp(calib["x"], calib["t"])
            sync(device)
    return fp, calib, g, (time.time() - t0) / batch


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    fp, calib, g, fwd = full_size_unet(cfg.batch, cfg.steps, device)
    q = dq.quantize(fp, w_bits=cfg.bits, a_bits=cfg.bits, sm_bits=8, T=cfg.steps, example=example)
    # min-max init: BKD's cost does not depend on it (the L_p search at T = 100 is sync-bound on a GPU,
    # ~1 s a layer)
    dq.init_tpq(q, calib, cfg.steps, search=False)
    print(f"{sum(p.numel() for p in fp.parameters()) / 1e6:.2f} M parameters, W{cfg.bits}A{cfg.bits}, "
          f"T = {cfg.steps}, batch {cfg.batch}, {device} ({torch.get_num_threads()} threads)")

    units, total_iter, cache_bytes = dq.blocks_in_order(q, example), 0.0, 0
    fp_mods, q_mods = dict(fp.named_modules()), dict(q.named_modules())
    for name in units:
        _, target = dq.block_io(fp, fp_mods[name], calib, cfg.batch, want_output=True)
        dq.switch(q, True)
        q_in, _ = dq.block_io(q, q_mods[name], calib, cfg.batch, want_output=False)
        cache_bytes = max(cache_bytes, sum(a[0].numel() for a in q_in + [target]) * 4 * cfg.calib)
        args = (q_mods[name], q_in, target, calib["idx"])
        lrs = dict(lr_w=1e-5, lr_q=1e-4)                                           # dilatequant.py's defaults
        dq.distill_block(*args, iters=1, batch=cfg.batch, generator=g, **lrs)      # warm-up
        sync(device)
        t0 = time.time()
        dq.distill_block(*args, iters=cfg.iters, batch=cfg.batch, generator=g, **lrs)
        sync(device)
        sec = (time.time() - t0) / cfg.iters
        total_iter += sec
        print(f"  {name:24s} {sec * 1e3:9.1f} ms/iteration")

    bkd_s = total_iter * cfg.paper_iters
    calib_s = cfg.calib_traj * cfg.steps * fwd                                 # FP trajectories
    cache_s = len(units) * 2 * cfg.calib * fwd                                 # <= 2 forwards per block
    print(f"\n{len(units)} blocks; {total_iter:.3f} s per iteration of every block; "
          f"FP forward {fwd * 1e3:.2f} ms/image")
    memory = "GPU allocated" if device.type == "cuda" else "process RSS"
    print(f"peak memory {peak_mb(device):.0f} MB ({memory}); "
          f"largest block cache for {cfg.calib} samples (fp32): {cache_bytes / 2 ** 20:.0f} MB")
    total_s = bkd_s + calib_s + cache_s
    print(f"full schedule ({cfg.paper_iters} iterations/block): BKD {bkd_s / 3600:.2f} h + calibration "
          f"{calib_s / 3600:.2f} h + caching <= {cache_s / 3600:.2f} h = {total_s / 3600:.2f} h "
          f"(paper: 1.08 h, 3,439 MB on one RTX A6000)")


if __name__ == "__main__":
    run_main(main)
