"""
Cost of Q-DiT on the paper's DiT-XL/2 (675 M parameters at full depth; random weights: the cost does not
depend on the values) at the official settings (Juanerx/Q-DiT quant_main.sh, evolution.sh):

- the GPTQ pass over every quantized layer (qkv, proj, fc1, fc2, adaLN of each block; g = 128, blocksize
  128): Hessians from the calibration samples at batch 32 (dynamic W4A8 activations on), then the
  column-by-column solves;
- one fitness evaluation of the search: W4A8 RTN weights with dynamic activations, 800 images, 50 DDIM
  steps without CFG at batch 16, SD-VAE decode, FID Inception features, the Fréchet distance (qdit.fid_few).

Time and peak memory. A CPU runs a reduced form (--blocks of the 28, fewer calibration samples, images and
steps) and the full size is extrapolated: Hessians scale with blocks × samples, solves with blocks,
sampling with images × steps, decoding and Inception with images. --blocks 28 --calib 256 --fit-n 800
--fit-steps 50 is the full size, measured.

    python bench/bench_qdit.py                        # CPU: 2 of 28 blocks, 32 samples, 2 images x 2 steps
    python bench/bench_qdit.py --blocks 28 --calib 256 --fit-n 64 --fit-steps 50 --device cuda
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qdit
from common import ddim_timesteps, linear_alphas_cumprod, parse_config, peak_mb, pick_device, run_main
from eval_fid import InceptionV3
from models.dit import XL_2, DiT
from models.vae import SD, VAEDecoder


@dataclass
class Config:
    """Time Q-DiT's GPTQ pass and one search fitness evaluation on DiT-XL/2 (256 px) with random weights."""
    blocks: int = 2               # DiT blocks built and timed (of 28); the rest is extrapolated
    calib: int = 32               # calibration samples for the Hessians (paper: 256)
    w_bits: int = 4               # weight bits (paper: 4)
    a_bits: int = 8               # activation bits (paper: 8)
    group_size: int = 128         # g (paper: 128)
    fit_n: int = 2                # images of the timed fitness evaluation (paper: 800)
    fit_steps: int = 2            # DDIM steps of the timed fitness evaluation (paper: 50)
    fit_batch: int = 16           # images per sampling batch (official: 16)
    device: str = "auto"          # auto, cpu or cuda


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, f, *args, **kwargs):
    sync(device)
    t0 = time.time()
    out = f(*args, **kwargs)
    sync(device)
    return out, time.time() - t0


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    fp = DiT(**{**XL_2, "depth": cfg.blocks}, input_size=32).eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(0)
    calib = dict(x=torch.randn(cfg.calib, 4, 32, 32, generator=g).to(device),
                 t=torch.randint(1000, (cfg.calib,), generator=g).float().to(device),
                 y=torch.randint(1000, (cfg.calib,), generator=g).to(device))
    params = sum(p.numel() for p in fp.parameters()) / 1e6
    print(f"DiT-XL/2 with {cfg.blocks} of 28 blocks ({params:.0f} M parameters), W{cfg.w_bits}A{cfg.a_bits} "
          f"g {cfg.group_size}, {cfg.calib} calibration samples, {device} "
          f"({torch.get_num_threads()} threads)")

    # GPTQ: the whole pass, and the solves alone (the same layers, a random positive-definite H) to split it
    genes = [cfg.group_size] * len(qdit.gene_layers(fp))
    q = qdit.quantize(fp, genes, cfg.a_bits, False, "dynamic", adaln_g=cfg.group_size)
    _, total = timed(device, qdit.gptq_model, q, calib, cfg.w_bits, False, blocksize=128, damp=0.01, batch=32)
    solve = 0.0
    for m in qdit.qlinears(q)[:5]:                                     # block 0: qkv, proj, fc1, fc2, adaLN
        X = torch.randn(512, m.weight.shape[1], generator=g).to(device)
        _, sec = timed(device, qdit.gptq, m.weight, X.T @ X, cfg.w_bits, m.g, False)
        solve += sec
    hess = max(total - cfg.blocks * solve, 0.0)
    full_gptq = 28 * solve + hess * 28 / cfg.blocks * 256 / cfg.calib
    # memory at 28 blocks: + the missing blocks' weights in the FP model and its quantized copy (fp32), + the
    # cached block inputs and outputs growing from cfg.calib to 256 samples ([n, 256, 1152] fp32 each)
    block_mb = sum(p.numel() for p in fp.blocks[0].parameters()) * 4 * 2 / 2 ** 20
    cache_mb = 2 * (256 - cfg.calib) * 256 * 1152 * 4 / 2 ** 20
    gptq_mb = peak_mb(device)
    print(f"GPTQ: {total:.1f} s for {cfg.blocks} blocks and {cfg.calib} samples = {solve:.1f} s of solves "
          f"per block + {hess:.1f} s Hessians and block passes; peak {gptq_mb:.0f} MB -> 28 blocks, "
          f"256 samples: {full_gptq / 60:.1f} min, "
          f"~{gptq_mb + (28 - cfg.blocks) * block_mb + cache_mb:.0f} MB")

    # One fitness evaluation: RTN (symmetric: evolution.sh's search quantizer), dynamic activations, no CFG
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    q = qdit.quantize(fp, genes, cfg.a_bits, True, "dynamic", adaln_g=cfg.group_size)
    qdit.rtn_weights(q, cfg.w_bits, True)
    vae = VAEDecoder(**SD).eval().requires_grad_(False).to(device)
    inception = InceptionV3(with_fc=False).eval().requires_grad_(False)
    inception = inception.to(device, memory_format=torch.channels_last)
    noise = torch.randn(cfg.fit_n, 4, 32, 32, generator=g).to(device)
    labels = torch.randint(1000, (cfg.fit_n,), generator=g).to(device)
    seq, abar = ddim_timesteps("even", cfg.fit_steps), linear_alphas_cumprod()
    with torch.no_grad():
        _, t_sample = timed(device, qdit.sample, q, noise, labels, seq, abar, cfg_scale=1.0,
                            batch=cfg.fit_batch, vae=None, progress=False)
        latents = noise[: min(cfg.fit_batch, cfg.fit_n)]
        x, t_vae = timed(device, vae.decode, latents)
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [b, 3, 256, 256]
        f, t_inc = timed(device, inception, u8.float() / 255)
    mu_r = torch.zeros(2048, dtype=torch.float64, device=device)
    sigma_r = torch.eye(2048, dtype=torch.float64, device=device)
    f_800 = torch.randn(800, 2048, generator=g, dtype=torch.float64).to(device)
    _, t_fid = timed(device, qdit.fid_few, f_800, mu_r, sigma_r)
    per_step = t_sample / (cfg.fit_n * cfg.fit_steps) * 28 / cfg.blocks    # s per image and step, 28 blocks
    per_image = (t_vae + t_inc) / len(latents)
    full_fit = per_step * 800 * 50 + per_image * 800 + t_fid
    mem = "GPU allocated" if device.type == "cuda" else "process RSS"
    print(f"fitness: sampling {per_step * 1e3:.0f} ms per image-step (28 blocks), VAE decode "
          f"{t_vae / len(latents):.2f} s + Inception {t_inc / len(latents):.2f} s per image, Fréchet "
          f"distance of 800 {t_fid:.2f} s; peak {peak_mb(device):.0f} MB ({mem}) -> one evaluation "
          f"(800 images x 50 steps): {full_fit / 60:.1f} min, "
          f"~{peak_mb(device) + (28 - cfg.blocks) * block_mb:.0f} MB; "
          f"the search (<= 550 evaluations): {550 * full_fit / 3600:.0f} h")


if __name__ == "__main__":
    run_main(main)
