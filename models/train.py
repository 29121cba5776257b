"""
Train the project's bundled models with the objective of Ho et al. 2020 (Algorithm 1): ε-prediction,
linear β over 1000 steps, uniform t, Adam with warm-up and gradient clipping, an EMA of the weights,
random horizontal flips. Writes the EMA weights as fp16 safetensors: the file every method loads by
default, through the same strict path as the official checkpoints.

- `ddpm-cifar10-small`: the `UNet` of models/ddpm.py, narrower than the paper's CIFAR-10 model.
- `dit-cifar10-small`: the `DiT` of models/dit.py in pixel space, class-conditional. As DiT trains
  (Peebles & Xie §3, official train.py): the official init (adaLN-Zero), labels replaced by the null
  class with probability 0.1 so that one network gives both halves of classifier-free guidance.
  Unlike DiT, ε-MSE only (learn_sigma=False): DiT's learned variance needs the L_vlb term of improved
  DDPM, and Q-DiT samples with DDIM η = 0, which never reads it.

    python -m models.train --data ../shared/assets/cifar10-fragment.npz     # the bundled UNet
    python -m models.train --model dit-cifar10-small --bf16 --compile        # the bundled DiT
    python -m models.train --data cifar-10-batches-py --steps 200000        # the full training set

Data: an .npz with `train_images` (N, 32, 32, 3) uint8 (or `arr_0`) and, for the DiT, `train_labels`,
or the official `cifar-10-batches-py` folder. Resumable: the state in --workdir is picked up again.
--bf16 --compile (bfloat16 autocast, torch.compile) make a DiT step about 2× faster on a CPU with AMX.
"""
import os
import pickle
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, atomic_write, ddim_sample, ddim_timesteps, linear_alphas_cumprod,
                    parse_config, pick_device, run_main, save_grid, save_safetensors, seed_everything)
from models import ddpm, dit


@dataclass
class Config:
    """Train a bundled diffusion model (UNet or DiT) on CIFAR-10-format images (see the module docstring)."""
    data: str = (  # .npz with train_images/arr_0, or a cifar-10-batches-py folder
        "../shared/assets/cifar10-fragment.npz")
    model: str = "ddpm-cifar10-small"    # architecture, a key of models.ddpm.CONFIGS or dit-cifar10-small
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
    init: str = ""  # warm start: net and EMA from exported weights, fresh Adam (a saved state wins)
    class_dropout: float = 0.1  # DiT: probability that a label is replaced by the null class (DiT: 0.1)
    bf16: bool = False         # bfloat16 autocast of the forward pass (fp32 weights, Adam and EMA)
    compile: bool = False      # torch.compile the network (needs a C++ compiler on a CPU)


# The UNet keeps the defaults above. The DiT: Adam 3e-4 (DiT: AdamW 1e-4 at batch 256 and 33 M+ parameters),
# its own output file and workdir. Flags given on the command line win.
PRESETS = {**{m: {} for m in ddpm.CONFIGS},
           "dit-cifar10-small": dict(lr=3e-4, out="models/dit_cifar10_small.safetensors",
                                     workdir="runs/train_dit")}


def load_images(path, labels=False):
    """CIFAR-10 training images as uint8 [N, 32, 32, 3]; with labels=True also their labels, int64 [N]."""
    if os.path.isdir(path):
        files = [os.path.join(path, f"data_batch_{i}") for i in range(1, 6)]
        if not all(os.path.isfile(f) for f in files):
            raise UserError(f"{path}: expected data_batch_1..5 of cifar-10-batches-py")
        batches = [pickle.load(open(f, "rb"), encoding="bytes") for f in files]
        # R, G, B planes
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return (x, np.concatenate([b[b"labels"] for b in batches]).astype(np.int64)) if labels else x
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file or folder; pass --data")
    with np.load(path) as z:
        key = "train_images" if "train_images" in z.files else "arr_0"
        if key not in z.files or z[key].ndim != 4 or z[key].shape[-1] != 3 or z[key].dtype != np.uint8:
            raise UserError(f"{path}: needs train_images or arr_0 as uint8 [N, H, W, 3]")
        if labels and ("train_labels" not in z.files or z["train_labels"].shape != z[key].shape[:1]):
            raise UserError(f"{path}: a class-conditional model needs train_labels [N] next to {key}")
        return (z[key], z["train_labels"].astype(np.int64)) if labels else z[key]


def dit_init(net):
    """The official DiT initialize_weights: Xavier-uniform Linears (and patch embedding, as a Linear) with
    zero biases, N(0, 0.02) label table and timestep MLP, and zeros in every adaLN modulation and in the
    final Linear, so that each block starts as the identity (adaLN-Zero, DiT §3.2)."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(net.x_embedder.proj.weight.view(net.x_embedder.proj.weight.shape[0], -1))
    nn.init.zeros_(net.x_embedder.proj.bias)
    nn.init.normal_(net.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(net.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(net.t_embedder.mlp[2].weight, std=0.02)
    for m in ([b.adaLN_modulation[-1] for b in net.blocks]
              + [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]):
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
    return net


def main():
    cfg = parse_config(Config, PRESETS)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    is_dit = cfg.model in dit.CONFIGS
    images, labels = load_images(cfg.data, labels=True) if is_dit else (load_images(cfg.data), None)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8
    abar = linear_alphas_cumprod().float().to(device)              # ᾱ_t, [1000]

    def build():
        return dit_init(dit.DiT(**dit.CONFIGS[cfg.model])) if is_dit else ddpm.UNet(**ddpm.CONFIGS[cfg.model])
    net, ema = build().to(device), build().to(device).eval().requires_grad_(False)
    if is_dit:
        labels, n_cls = torch.from_numpy(labels), net.num_classes
        if not 0 <= labels.min() <= labels.max() < n_cls:
            raise UserError(f"{cfg.data}: labels must lie in 0..{n_cls - 1} for {cfg.model}")
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)                  # batches, t and noise
    state_path, step = os.path.join(cfg.workdir, "state.pt"), 0
    if os.path.isfile(state_path):
        s = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(s["net"])
        ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"])
        gen.set_state(s["gen"])
        step = s["step"]
        print(f"resumed from {state_path} at step {step}")
    elif cfg.init:
        # the strict loaders
        sd = (dit.load_dit if is_dit else ddpm.load_unet)(cfg.model, cfg.init).state_dict()
        net.load_state_dict(sd)
        ema.load_state_dict(sd)
        print(f"warm start from {cfg.init}")
    if not cfg.init and cfg.ema ** (cfg.steps - step) > 0.01:    # a lesson of the GPU run (README)
        print(f"warning: EMA {cfg.ema} over {cfg.steps - step} steps keeps "
              f"{cfg.ema ** (cfg.steps - step):.0%} of the random initial weights; "
              f"lower --ema or raise --steps")
    print(f"{cfg.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
          f"{len(images)} images, {cfg.steps - step} steps of {cfg.batch} on {device}")

    fwd = torch.compile(net) if cfg.compile else net
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
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        args = (x_t, t.float())
        # label dropout: the null class n_cls trains the unconditional ε of classifier-free guidance
        if is_dit:
            drop = torch.rand(cfg.batch, generator=gen) < cfg.class_dropout
            args += (torch.where(drop, n_cls, labels[idx]).to(device),)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
            out = fwd(*args)[:, :3]                                 # ε channels (learn_sigma: + the variance)
        loss = F.mse_loss(out.float(), eps)
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
            # DiT's sin-cos table stays fp32
            save_safetensors({k: v if k == "pos_embed" else v.half() for k, v in ema.state_dict().items()},
                             cfg.out, metadata=dict(asdict(cfg), step=done, model=cfg.model))
        if done % cfg.sample_every == 0 or done == cfg.steps:
            g = torch.Generator(device).manual_seed(0)
            x = torch.randn(64, 3, 32, 32, generator=g, device=device)
            if is_dit:  # DiT's respacing, 6-7 images a class, CFG 1.5 (Q-DiT's setting)
                y = torch.arange(64, device=device) % n_cls
                x = ddim_sample(dit.eps_fn(ema, y, 1.5), x, ddim_timesteps("even", 50),
                                linear_alphas_cumprod())
            else:
                x = ddim_sample(ema, x, ddim_timesteps("quad", 50), linear_alphas_cumprod(), generator=g)
            save_grid(x, os.path.join(cfg.workdir, f"samples_{done:06d}.png"))
    print(f"{cfg.steps} steps, {time.time() - t0:.0f} s this run; EMA weights -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
