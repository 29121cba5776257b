"""
Train the project's bundled DDPM: the `UNet` of models/ddpm.py, narrower than the paper's
CIFAR-10 model, with the objective of Ho et al. 2020 (Algorithm 1): ε-prediction, linear β over
1000 steps, uniform t, Adam with warm-up and gradient clipping, an EMA of the weights, random
horizontal flips. Writes the EMA weights as fp16 safetensors: the file every method loads by
default, through the same strict path as the official checkpoints.

    python -m models.train --data ../shared/assets/cifar10-fragment.npz     # the bundled model
    python -m models.train --data cifar-10-batches-py --steps 200000        # the full training set

Data: an .npz with `train_images` (N, 32, 32, 3) uint8 (or `arr_0`), or the official
`cifar-10-batches-py` folder. Resumable: the state in --workdir is picked up again when present.
"""
import os
import pickle
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, atomic_write, ddim_sample, ddim_timesteps, linear_alphas_cumprod, parse_config,
                    pick_device, run_main, save_grid, save_safetensors, seed_everything)
from models.ddpm import CONFIGS, UNet, load_unet


@dataclass
class Config:
    """Train a DDPM UNet on CIFAR-10-format images (see the module docstring)."""
    data: str = "../shared/assets/cifar10-fragment.npz"  # .npz with train_images/arr_0, or a cifar-10-batches-py folder
    model: str = "ddpm-cifar10-small"    # architecture, a key of models.ddpm.CONFIGS
    steps: int = 20000                   # optimizer steps in total (a resumed run continues up to this)
    batch: int = 64                      # images per step
    lr: float = 5e-4                     # Adam learning rate after warm-up (DDPM: 2e-4 at 35.7 M parameters)
    warmup: int = 500                    # linear warm-up steps (DDPM: 5000)
    grad_clip: float = 1.0               # gradient-norm clip (DDPM: 1.0)
    ema: float = 0.999                   # EMA decay of the weights (DDPM: 0.9999, for 800k steps)
    save_every: int = 500                # steps between resumable states and exported EMA weights
    sample_every: int = 2000             # steps between sample grids (DDIM-50, 64 images)
    seed: int = 0                        # seed of init, batches, t and noise
    device: str = "auto"                 # auto, cpu or cuda
    workdir: str = "runs/train"          # resumable state and sample grids
    out: str = "models/ddpm_cifar10_small.safetensors"  # the exported EMA weights (fp16)
    init: str = ""                       # warm start: net and EMA from exported weights, fresh Adam (a saved state wins)


def load_images(path):
    """CIFAR-10 training images as uint8 [N, 32, 32, 3]."""
    if os.path.isdir(path):
        files = [os.path.join(path, f"data_batch_{i}") for i in range(1, 6)]
        if not all(os.path.isfile(f) for f in files):
            raise UserError(f"{path}: expected data_batch_1..5 of cifar-10-batches-py")
        rows = [pickle.load(open(f, "rb"), encoding="bytes")[b"data"] for f in files]  # [10000, 3072] R, G, B planes
        return np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; pass --data")
    with np.load(path) as z:
        key = "train_images" if "train_images" in z.files else "arr_0"
        if key not in z.files or z[key].ndim != 4 or z[key].shape[-1] != 3 or z[key].dtype != np.uint8:
            raise UserError(f"{path}: needs train_images or arr_0 as uint8 [N, H, W, 3]")
        return z[key]


def main():
    cfg = parse_config(Config)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if cfg.model not in CONFIGS:
        raise UserError(f"unknown --model {cfg.model!r}; choose one of {', '.join(CONFIGS)}")
    images = torch.from_numpy(load_images(cfg.data)).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8
    abar = linear_alphas_cumprod().float().to(device)              # ᾱ_t, [1000]

    net = UNet(**CONFIGS[cfg.model]).to(device)
    ema = UNet(**CONFIGS[cfg.model]).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)                  # batches, t and noise
    state_path, step = os.path.join(cfg.workdir, "state.pt"), 0
    if os.path.isfile(state_path):
        s = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(s["net"]), ema.load_state_dict(s["ema"]), opt.load_state_dict(s["opt"])
        gen.set_state(s["gen"])
        step = s["step"]
        print(f"resumed from {state_path} at step {step}")
    elif cfg.init:
        sd = load_unet(cfg.model, cfg.init).state_dict()           # the project's strict loader
        net.load_state_dict(sd), ema.load_state_dict(sd)
        print(f"warm start from {cfg.init}")
    if not cfg.init and cfg.ema ** (cfg.steps - step) > 0.01:                # a lesson of the GPU run (README)
        print(f"warning: EMA {cfg.ema} over {cfg.steps - step} steps keeps {cfg.ema ** (cfg.steps - step):.0%} "
              f"of the random initial weights; lower --ema or raise --steps")
    print(f"{cfg.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
          f"{len(images)} images, {cfg.steps - step} steps of {cfg.batch} on {device}")

    t0, bar = time.time(), tqdm(range(step, cfg.steps), initial=step, total=cfg.steps)
    for step in bar:
        # Algorithm 1: x_0 ~ data, t ~ U{0..999}, ε ~ N(0, I), step on ||ε − ε_θ(√ᾱ x_0 + √(1−ᾱ) ε, t)||²
        idx = torch.randint(len(images), (cfg.batch,), generator=gen)
        x0 = images[idx].float() / 127.5 - 1                        # [B, 3, 32, 32] in [−1, 1]
        flip = torch.rand(cfg.batch, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0).to(device)
        t = torch.randint(1000, (cfg.batch,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float()), eps)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - cfg.ema)                            # θ_ema ← d·θ_ema + (1 − d)·θ
        bar.set_postfix(loss=f"{loss.item():.4f}")

        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.steps:
            with atomic_write(state_path) as f:
                torch.save(dict(net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                gen=gen.get_state(), step=done), f)
            save_safetensors({k: v.half() for k, v in ema.state_dict().items()}, cfg.out,
                             metadata=dict(asdict(cfg), step=done, model=cfg.model))
        if done % cfg.sample_every == 0 or done == cfg.steps:
            g = torch.Generator(device).manual_seed(0)
            x = torch.randn(64, 3, 32, 32, generator=g, device=device)
            x = ddim_sample(ema, x, ddim_timesteps("quad", 50), linear_alphas_cumprod(), generator=g)
            save_grid(x, os.path.join(cfg.workdir, f"samples_{done:06d}.png"))
    print(f"{cfg.steps} steps, {time.time() - t0:.0f} s this run; EMA weights -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
