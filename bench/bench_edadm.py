"""
Cost of EDA-DM on the paper's full-size CIFAR-10 UNet (35.7 M parameters, random weights: the cost does not
depend on the values), at the official CIFAR-10 settings (BienLuky/EDA-DM scripts/for_cifar.sh): TDAC (FP
trajectories, the density/variety scores of the mid-attention feature over T_s = 100 steps), and FBR
(seconds per reconstruction iteration of every unit at batch 32, with the γ layer terms), peak memory, and
the full schedule extrapolated (1,024 trajectories x 100 steps, per-unit caching of 1,024 samples, 5,000
iterations per unit).

    python bench/bench_edadm.py                           # CPU or the GPU if there is one
    python bench/bench_edadm.py --iters 20 --device cuda
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import edadm as ed
from common import parse_config, peak_mb, pick_device, run_main
from models.ddpm import CONFIGS, UNet


@dataclass
class Config:
    """Time EDA-DM's TDAC selection and FBR reconstruction on the full-size DDPM CIFAR-10 UNet."""
    iters: int = 3                # timed reconstruction iterations per unit (after one warm-up iteration)
    batch: int = 32               # reconstruction batch (paper: 32)
    w_bits: int = 4               # weight bits (paper: 4 or 8)
    a_bits: int = 8               # activation bits (paper: 8)
    gamma: float = 0.8            # FBR layer-loss weight (paper, CIFAR-10: 0.8)
    steps: int = 100              # sampler steps T_s (paper: DDIM-100)
    calib: int = 1024             # N calibration samples of the full schedule (paper: 1024)
    calib_traj: int = 1024        # B trajectories of the full schedule (paper: 1024)
    tdac_traj: int = 64           # trajectories whose features are scored here (the cost is linear in B)
    paper_iters: int = 5000       # iterations per unit of the full schedule (paper: 5000)
    device: str = "auto"          # auto, cpu or cuda


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size_unet(batch, device):
    """The full-size UNet with random weights, one batch of random calibration inputs (x_t, t), a generator
    for what else is random, and the seconds of one FP forward per image (after a warm-up): the unit of the
    trajectory and caching costs."""
    torch.manual_seed(0)
    fp = UNet(**CONFIGS["ddpm-cifar10"]).eval().requires_grad_(False).to(device)
    example = (torch.zeros(1, 3, 32, 32, device=device), torch.zeros(1, device=device))
    g = torch.Generator().manual_seed(0)
    calib = dict(x=torch.randn(batch, 3, 32, 32, generator=g).to(device),
                 t=torch.randint(1000, (batch,), generator=g).float().to(device))
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
    fp, calib, g, fwd = full_size_unet(cfg.batch, device)   # random weights; seconds per FP forward/image
    print(f"{sum(p.numel() for p in fp.parameters()) / 1e6:.2f} M parameters, W{cfg.w_bits}A{cfg.a_bits}, "
          f"T_s = {cfg.steps}, batch {cfg.batch}, γ {cfg.gamma}, {device} "
          f"({torch.get_num_threads()} threads)")

    # TDAC scores on random mid-attention features of the paper's shape [T_s, B, 256, 4, 4]
    Fk = torch.randn(cfg.steps, cfg.tdac_traj, 256, 4, 4, generator=g).to(device)
    t0 = time.time()
    D, V, _ = ed.tdac_scores(Fk, 3.0)
    ed.tdac_counts(D.cpu(), V.cpu(), 1.2, cfg.calib)
    sync(device)
    score_s = (time.time() - t0) * cfg.calib_traj / cfg.tdac_traj
    feat_mb = Fk.numel() * 4 / 2 ** 20 * cfg.calib_traj / cfg.tdac_traj
    del Fk

    q = ed.quantize(fp, cfg.w_bits, cfg.a_bits, 8, search=False, example=example)  # min-max: same cost
    ed.init_acts(q, calib, search=False)
    units = ed.units_in_order(q, example)
    total_iter = 0.0
    cache_bytes = 0
    fp_mods, q_mods = dict(fp.named_modules()), dict(q.named_modules())
    train = dict(gamma=cfg.gamma, batch=cfg.batch, lr_w=5e-1, lr_a=5e-4, qdrop=0.5, round_reg=0.0,
                 generator=g)                                     # the official W4A8 settings
    for name in units:
        unit = q_mods[name]
        layers = ed.inner_layers(unit) if cfg.gamma > 0 else []
        fp_io = ed.unit_io(fp, fp_mods[name], calib, cfg.batch, layers)          # (x_fp, y_fp, o_fp)
        x_fp, y_fp, o_fp = fp_io
        ed.switch(q, True)
        x_q, _, _ = ed.unit_io(q, unit, calib, cfg.batch)
        per_sample = sum(a[0].numel() for a in x_fp + x_q + [y_fp] + o_fp)
        cache_bytes = max(cache_bytes, per_sample * 4 * cfg.calib)
        ed.reconstruct_unit(unit, fp_io, x_q, layers, iters=1, **train)                   # warm-up
        sync(device)
        t0 = time.time()
        ed.reconstruct_unit(unit, fp_io, x_q, layers, iters=cfg.iters, **train)
        sync(device)
        sec = (time.time() - t0) / cfg.iters
        total_iter += sec
        print(f"  {name:28s} {sec * 1e3:9.1f} ms/iteration ({len(layers)} layer terms)")

    recon_s = total_iter * cfg.paper_iters
    traj_s = cfg.calib_traj * cfg.steps * fwd                                  # FP trajectories
    cache_s = len(units) * 2 * cfg.calib * fwd                                 # <= 2 forwards per unit
    print(f"\nTDAC: FP forward {fwd * 1e3:.2f} ms/image -> {cfg.calib_traj} x {cfg.steps} trajectories "
          f"{traj_s / 3600:.2f} h; scores {score_s:.1f} s for B = {cfg.calib_traj} (measured on "
          f"{cfg.tdac_traj}, linear in B); features {feat_mb:.0f} MB (fp32)")
    memory = "GPU allocated" if device.type == "cuda" else "process RSS"
    print(f"FBR: {len(units)} units; {total_iter:.3f} s per iteration of every unit; peak memory "
          f"{peak_mb(device):.0f} MB ({memory}); largest unit cache for {cfg.calib} samples (fp32): "
          f"{cache_bytes / 2 ** 20:.0f} MB")
    total_h = (recon_s + traj_s + cache_s) / 3600
    print(f"full schedule ({cfg.paper_iters} iterations/unit): reconstruction {recon_s / 3600:.2f} h + "
          f"trajectories {traj_s / 3600:.2f} h + caching <= {cache_s / 3600:.2f} h = {total_h:.2f} h")


if __name__ == "__main__":
    run_main(main)
