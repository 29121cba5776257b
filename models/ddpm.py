"""
The DDPM UNet of Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020,
arXiv 2006.11239; TF code hojonathanho/diffusion), with the module names of its PyTorch port
(pesser/pytorch_diffusion, ermongroup/ddim `Model`), so the CIFAR-10 checkpoint
`model-790000.ckpt` loads with strict=True, and `from_diffusers` maps the diffusers layout
(`google/ddpm-cifar10-32`) onto the same names.

- ε-prediction UNet: ResnetBlocks with a time-embedding projection, self-attention at 16×16,
  skip connections concatenated on the way up (CIFAR-10: ch 128, ch_mult (1, 2, 2, 2), 35.7 M).
- Identity hook points where a quantization method must reach inside a block: the attention
  matmul inputs (q, k, softmax output, v) and the two halves of each skip concatenation
  as seen by the shortcut conv. They cost nothing in full precision.

    python -m models.ddpm --out grid.png                          # the bundled model, offline
    python -m models.ddpm --model ddpm-cifar10 --out grid.png     # the paper's (downloads 143 MB)
    torchrun --nproc_per_node 8 -m models.ddpm -- --model ddpm-cifar10 --n 50000 --batch 500 --out s.npz
    python -m models.ddpm --load runs/dilatequant/dilatequant.int.safetensors   # integer kernels (intq.py)
"""
import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, ddim_sample, ddim_timesteps, fetch_checkpoint, linear_alphas_cumprod,
                    load_state_dict, load_strict, parse_config, run_main, seed_everything)

# Architectures by model name; the weights come from common.CHECKPOINTS under the same name.
CONFIGS = {
    # The paper's CIFAR-10 model (ermongroup/ddim configs/cifar10.yml), 35.7 M parameters.
    "ddpm-cifar10": dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                         dropout=0.1, in_channels=3, resolution=32),
    # The bundled model, trained by models/train.py: 1.1 M parameters, ~30x cheaper per image.
    # No dropout: its training run is short (compute-bound), not long enough to overfit.
    # GroupNorm keeps >= 4 channels a group (min_group), see Normalize.
    "ddpm-cifar10-small": dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                               dropout=0.0, in_channels=3, resolution=32, min_group=4),
}


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the (float) timestep, [B] -> [B, dim]: sin half then cos half."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]                      # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)     # [B, dim]


def Normalize(channels, min_group=1):
    # 32 groups as in the paper (min_group=1). The bundled narrow model keeps >= 4 channels a group:
    # at 32 channels, 32 groups is instance norm, which erases each image's mean colour.
    return nn.GroupNorm(num_groups=min(32, channels // min_group), num_channels=channels, eps=1e-6,
                        affine=True)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))                    # TF "SAME" padding: [B, C, H/2, W/2]


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the projected time embedding added in between.
    `split` > 0 marks an up-path block whose input is cat([h, skip]) with split = channels of h:
    the shortcut conv then sees the halves through the hooks `shortcut_h` and `shortcut_skip`."""

    def __init__(self, in_channels, out_channels, temb_channels, dropout, split=0, min_group=1):
        super().__init__()
        self.in_channels, self.out_channels, self.split = in_channels, out_channels, split
        self.norm1 = Normalize(in_channels, min_group)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, min_group)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
            self.shortcut_h, self.shortcut_skip = nn.Identity(), nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))                       # [B, C_out, H, W]
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            if self.split:
                x = torch.cat([self.shortcut_h(x[:, :self.split]), self.shortcut_skip(x[:, self.split:])],
                              dim=1)
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, q/k/v/proj_out as 1×1 convs.
    Hooks act_q, act_k, act_v, act_softmax sit on the two matmul inputs each."""

    def __init__(self, channels, min_group=1):
        super().__init__()
        self.norm = Normalize(channels, min_group)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.act_q, self.act_k = nn.Identity(), nn.Identity()
        self.act_v, self.act_softmax = nn.Identity(), nn.Identity()

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        B, C, H, W = q.shape
        q = q.reshape(B, C, H * W).permute(0, 2, 1)                 # [B, HW, C]
        k = k.reshape(B, C, H * W)                                  # [B, C, HW]
        w = torch.bmm(self.act_q(q), self.act_k(k)) * C ** -0.5    # [B, HW_q, HW_k]
        w = F.softmax(w, dim=2)
        v = v.reshape(B, C, H * W)                                  # [B, C, HW_k]
        h = torch.bmm(self.act_v(v), self.act_softmax(w.permute(0, 2, 1)))  # [B, C, HW_q]
        return x + self.proj_out(h.reshape(B, C, H, W))


class UNet(nn.Module):
    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels,
                 resolution, min_group=1):
        super().__init__()
        self.ch, self.num_res_blocks, self.resolution = ch, num_res_blocks, resolution
        self.in_channels = in_channels
        self.num_resolutions = len(ch_mult)
        temb_ch = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        # down path: level i has num_res_blocks blocks of ch·ch_mult[i] channels, then halves H, W
        in_ch_mult, res = (1,) + tuple(ch_mult), resolution
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            level, block_in, block_out = nn.Module(), ch * in_ch_mult[i], ch * ch_mult[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, temb_ch, dropout, min_group=min_group))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, min_group))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout, min_group=min_group)
        self.mid.attn_1 = AttnBlock(block_in, min_group)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout, min_group=min_group)

        # up path: level i has num_res_blocks + 1 blocks, each taking one skip tensor; up[i] is
        # resolution level i, so up[-1] runs first (the checkpoint's indexing)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            level, block_out = nn.Module(), ch * ch_mult[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for j in range(num_res_blocks + 1):
                skip_in = ch * (in_ch_mult[i] if j == num_res_blocks else ch_mult[i])
                level.block.append(ResnetBlock(block_in + skip_in, block_out, temb_ch, dropout,
                                               split=block_in, min_group=min_group))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, min_group))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, level)

        self.norm_out = Normalize(block_in, min_group)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, stride=1, padding=1)

    def forward(self, x, t):
        """x: [B, C, H, W] noisy images, t: [B] timesteps (float or int) -> ε: [B, out_ch, H, W]."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        temb = timestep_embedding(t, self.ch)                       # [B, ch]
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # [B, 4ch]

        hs = [self.conv_in(x)]                                      # skip tensors, in order
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                hs.append(level.attn[j](h) if len(level.attn) else h)
            if i != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)    # [B, C_h + C_skip, H, W] in
                h = level.attn[j](h) if len(level.attn) else h
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def from_diffusers(sd):
    """diffusers UNet2DModel keys (google/ddpm-cifar10-32) -> this UNet's keys. up_blocks run in
    execution order, our `up` by resolution level, so up_blocks.i is up.(L−1−i); attention
    projections are Linear [C, C] there and 1×1 convs [C, C, 1, 1] here. Older diffusers files
    name them query/key/value/proj_attn, newer ones to_q/to_k/to_v/to_out.0: both are accepted."""
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("up_blocks."))
    rules = [(r"^time_embedding\.linear_(\d)\.", lambda m: f"temb.dense.{int(m[1]) - 1}."),
             (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
             (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
             (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
             (r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{L - 1 - int(m[1])}.block."),
             (r"^up_blocks\.(\d+)\.attentions\.", lambda m: f"up.{L - 1 - int(m[1])}.attn."),
             (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{L - 1 - int(m[1])}.upsample."),
             (r"^mid_block\.resnets\.0\.", "mid.block_1."), (r"^mid_block\.resnets\.1\.", "mid.block_2."),
             (r"^mid_block\.attentions\.0\.", "mid.attn_1."), (r"^conv_norm_out\.", "norm_out."),
             (r"\.time_emb_proj\.", ".temb_proj."), (r"\.conv_shortcut\.", ".nin_shortcut."),
             (r"\.group_norm\.", ".norm."), (r"\.(to_q|query)\.", ".q."), (r"\.(to_k|key)\.", ".k."),
             (r"\.(to_v|value)\.", ".v."), (r"\.(to_out\.0|proj_attn)\.", ".proj_out.")]
    out = {}
    for key, v in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if key.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")) and v.dim() == 2:
            v = v[:, :, None, None]                                 # Linear [C, C] -> conv [C, C, 1, 1]
        out[key] = v
    return out


def load_unet(model, ckpt=None):
    """The UNet of CONFIGS[model] with the weights of `ckpt` (a path or a CHECKPOINTS name;
    default: the model's own checkpoint), loaded strictly, in eval mode."""
    if model not in CONFIGS:
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(CONFIGS)}")
    path = fetch_checkpoint(ckpt or model)
    sd = load_state_dict(path)
    if any(k.startswith("down_blocks.") for k in sd):
        sd = from_diffusers(sd)
    return load_strict(UNet(**CONFIGS[model]), sd, path).eval()


# -----------------------------------------------------------------------------
# Sampling a grid from the command line

@dataclass
class Config:
    """Sample a PNG grid from a DDPM UNet with DDIM (python -m models.ddpm --model ddpm-cifar10)."""
    model: str = "ddpm-cifar10-small"  # ddpm-cifar10-small (bundled, offline) or ddpm-cifar10 (the paper's)
    ckpt: str = ""                # weights: a file or a checkpoint name (default: the model's own)
    n: int = 64                   # number of images
    steps: int = 100              # DDIM steps
    skip: str = "quad"            # timestep sequence: uniform, quad (CIFAR-10 setting) or even
    eta: float = 0.0              # DDIM eta (0: deterministic)
    seed: int = 0                 # seed: image i's noise comes from a generator seeded by (seed, i)
    batch: int = 64               # images per forward (the same for any number of processes)
    device: str = "auto"          # auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)
    out: str = "samples.png"      # a PNG grid, or .npz: uint8 [N, H, W, 3] under arr_0 (ADM's convention)
    load: str = ""                # a packed integer model (export_int.py) to sample instead of --model


def main():
    """One process, or one of WORLD_SIZE under torchrun (models.sample_sharded): the same images."""
    from models import distributed, sample_sharded, save_images    # here: `python -m models.ddpm` imports us
    cfg = parse_config(Config)
    if not cfg.out.endswith((".png", ".npz")) or cfg.n < 1 or cfg.batch < 1:
        raise UserError(f"--out {cfg.out} / --n {cfg.n} / --batch {cfg.batch}: need a .png or .npz file, "
                        "n >= 1 and batch >= 1")
    _, world, device = distributed(cfg.device)
    seed_everything(cfg.seed)
    seq, abar = ddim_timesteps(cfg.skip, cfg.steps), linear_alphas_cumprod()
    net, eps, step = (load_unet(cfg.model, cfg.ckpt or None), None, None) if not cfg.load else (None,) * 3
    if cfg.load:                                   # integer kernels (models/intq.py)
        from models import intq
        net, header, eps_k = intq.load_int_model(cfg.load)
        if header["model"] not in CONFIGS:
            raise UserError(f"{cfg.load}: a packed {header['model']}; sample it with python -m models.dit")
        if header["tool"] == "dilatequant" and cfg.steps != header["steps"]:
            raise UserError(f"--steps {cfg.steps}: {cfg.load} has quantizers for {header['steps']} steps")
        k_t, now = (eps_k if eps_k is not None else torch.ones(cfg.steps)).to(device), [0]

        def step(i):                               # DilateQuant: step i's quantizer row, and ε̂ / k_i
            now[0] = i
            intq.set_step(net, torch.tensor([i], device=device))

        def eps(x, t):
            return net(x, t) / k_t[now[0]]
    net = net.to(device)
    t0 = time.time()
    images = sample_sharded(lambda x, gens, idx: ddim_sample(eps or net, x.to(device), seq, abar, eta=cfg.eta,
                                                             generator=gens, before_step=step),
                            cfg.n, (net.in_channels, net.resolution, net.resolution), seed=cfg.seed,
                            batch=cfg.batch)
    if save_images(images, cfg.out):
        print(f"{cfg.n} samples, {cfg.steps} {cfg.skip} DDIM steps, {world} process(es), "
              f"{time.time() - t0:.1f} s -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
