"""
Cost of EDA-DM on the paper's full-size CIFAR-10 UNet (35.7 M parameters, random weights: the cost does not
depend on the values), at the paper's settings (spec §3.3, §4.6): TDAC (FP trajectories, the density/variety
scores of the mid-attention feature over T_s = 100 steps), and FBR (seconds per reconstruction iteration of
every unit at batch 32, with the γ layer terms), peak memory, and the full schedule extrapolated
(1,024 trajectories x 100 steps, per-unit caching of 1,024 samples, 5,000 iterations per unit).

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
from bench_dilatequant import full_size_unet, sync
from common import parse_config, pick_device, run_main


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


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    fp, calib, g, fwd = full_size_unet(cfg.batch, cfg.steps, device)   # random weights; s per FP forward/image
    print(f"{sum(p.numel() for p in fp.parameters()) / 1e6:.2f} M parameters, W{cfg.w_bits}A{cfg.a_bits}, "
          f"T_s = {cfg.steps}, batch {cfg.batch}, γ {cfg.gamma}, {device} ({torch.get_num_threads()} threads)")

    # TDAC scores on random mid-attention features of the paper's shape [T_s, B, 256, 4, 4]
    Fk = torch.randn(cfg.steps, cfg.tdac_traj, 256, 4, 4, generator=g).to(device)
    t0 = time.time()
    D, V, _ = ed.tdac_scores(Fk, 3.0)
    ed.tdac_counts(D.cpu(), V.cpu(), 1.2, cfg.calib)
    sync(device)
    score_s = (time.time() - t0) * cfg.calib_traj / cfg.tdac_traj
    feat_mb = Fk.numel() * 4 / 2 ** 20 * cfg.calib_traj / cfg.tdac_traj
    del Fk

    q = ed.quantize(fp, cfg.w_bits, cfg.a_bits, 8, search=False)  # min-max: the reconstruction cost is the same
    ed.init_acts(q, calib, search=False)
    units, total_iter, cache_bytes = ed.units_in_order(q), 0.0, 0
    fp_mods, q_mods = dict(fp.named_modules()), dict(q.named_modules())
    for name in units:
        unit = q_mods[name]
        layers = ed.inner_layers(unit) if cfg.gamma > 0 else []
        x_fp, y_fp, o_fp = ed.unit_io(fp, fp_mods[name], calib, cfg.batch, layers)
        ed.switch(q, True)
        x_q, _, _ = ed.unit_io(q, unit, calib, cfg.batch)
        per_sample = sum(a[0].numel() for a in x_fp + x_q + [y_fp] + o_fp)
        cache_bytes = max(cache_bytes, per_sample * 4 * cfg.calib)
        args = (unit, x_fp, x_q, y_fp, layers, o_fp, cfg.gamma)
        ed.reconstruct_unit(*args, 1, cfg.batch, 5e-1, 5e-4, 0.5, 0.0, g)           # warm-up
        sync(device)
        t0 = time.time()
        ed.reconstruct_unit(*args, cfg.iters, cfg.batch, 5e-1, 5e-4, 0.5, 0.0, g)
        sync(device)
        sec = (time.time() - t0) / cfg.iters
        total_iter += sec
        print(f"  {name:28s} {sec * 1e3:9.1f} ms/iteration ({len(layers)} layer terms)")

    recon_s = total_iter * cfg.paper_iters
    traj_s = cfg.calib_traj * cfg.steps * fwd                                  # FP trajectories
    cache_s = len(units) * 2 * cfg.calib * fwd                                 # <= 2 forwards per unit
    print(f"\nTDAC: FP forward {fwd * 1e3:.2f} ms/image -> {cfg.calib_traj} x {cfg.steps} trajectories "
          f"{traj_s / 3600:.2f} h; scores {score_s:.1f} s for B = {cfg.calib_traj} (measured on {cfg.tdac_traj}, "
          f"linear in B); features {feat_mb:.0f} MB (fp32)")
    print(f"FBR: {len(units)} units; {total_iter:.3f} s per iteration of every unit; peak memory "
          f"{ed.peak_mb(device):.0f} MB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'}); largest "
          f"unit cache for {cfg.calib} samples (fp32): {cache_bytes / 2 ** 20:.0f} MB")
    print(f"full schedule ({cfg.paper_iters} iterations/unit): reconstruction {recon_s / 3600:.2f} h + trajectories "
          f"{traj_s / 3600:.2f} h + caching <= {cache_s / 3600:.2f} h = {(recon_s + traj_s + cache_s) / 3600:.2f} h")


if __name__ == "__main__":
    run_main(main)
