"""
DiT of Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023, arXiv 2212.09748;
code facebookresearch/DiT @ed81ce2), written out by hand with the official module names, so
`DiT-XL-2-256x256.pt` and `DiT-XL-2-512x512.pt` load with strict=True. The official file takes its
patch embedding, attention and MLP from timm; here they are spelled out under timm's attribute names.

- Class-conditional transformer on SD-VAE latents (models/vae.py): 2×2 patches, 28 adaLN-Zero blocks
  of width 1152 with 16 heads, output ε (channels 0–3) and the variance interpolation v (4–7).
- `forward_with_cfg`: classifier-free guidance as the official code applies it, on channels 0–2 only;
  `eps_fn` turns a DiT and labels into the ε(x_t, t) that common.ddim_sample takes, with or without it.
- `dit-cifar10-small`: the project's bundled model, the same class in pixel space (models/train.py).
- Identity hook points on the attention matmul inputs (act_q, act_k, act_v, act_softmax), named as in
  models/ddpm.py. The Linears qkv, proj, fc1, fc2 (the layers official Q-DiT quantizes, qdit/qBlock.py)
  are quantized by replacing the Linear itself (common.replace_modules + QuantLinear.from_float).
- `python -m models.dit`: a DDIM sampler CLI like models/ddpm.py's (PNG grid or .npz, sharded under torchrun).
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, ddim_sample, ddim_timesteps, fetch_checkpoint, linear_alphas_cumprod,
                    load_state_dict, load_strict, parse_config, run_main)

# DiT-XL/2 (675 M parameters); the latent is image/8: 32×32 at 256 px (256 tokens), 64×64 at 512 px (1024).
XL_2 = dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)
# Architectures by model name; the weights come from common.CHECKPOINTS under the same name.
CONFIGS = {"dit-xl-2-256": dict(XL_2, input_size=32), "dit-xl-2-512": dict(XL_2, input_size=64),
           # The project's bundled model (models/train.py): the same class in pixel space on 32×32
           # CIFAR-10, 4×4 patches (64 tokens), width 128, 4 blocks, 1.29 M parameters, sized so that
           # 256 CFG samples with DDIM-50 take about a minute on 2 CPU cores. ε only (learn_sigma=False):
           # it is trained on the ε-MSE alone and DDIM never reads the variance. Linear inputs are 128
           # and 512 wide: g = 16, 32, 64, 128 divide both.
           "dit-cifar10-small": dict(input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=4,
                                     num_heads=4, num_classes=10, learn_sigma=False)}


def DiT_XL_2(**kw):
    return DiT(**XL_2, **kw)


def modulate(x, shift, scale):
    """adaLN: x·(1 + scale) + shift, one (shift, scale) [B, D] per sample, broadcast over the tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim=256, max_period=10000):
    """[B] (float) timesteps -> [B, dim]: cos half then sin half, f_k = max_period^(−k/half) (GLIDE/ADM).
    Not models/ddpm.py's embedding, which puts sin first and divides by half − 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                         # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)     # [B, dim]


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos position embedding of MAE, [grid², dim] for the row-major tokens: the first dim/2
    channels encode the token's column, the last dim/2 its row; each half is [sin(pos·ω), cos(pos·ω)],
    ω_k = 10000^(−k/(dim/4)). float64 like the official numpy code, stored as float32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))      # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64),
                                indexing="ij")                      # [grid, grid] each

    def embed(pos):                                                 # [grid, grid] -> [grid², dim/2]
        angle = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    return torch.cat([embed(cols), embed(rows)], dim=1).float()    # [grid², dim]


#################################################################################
#                 The three timm modules, written out with timm's names          #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens: a p×p convolution with stride p, flattened row-major."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)             # [B, C, H, W] -> [B, T = HW/p², D]


class Attention(nn.Module):
    """Multi-head self-attention with one qkv Linear (bias) and an output Linear `proj`:
    softmax(q kᵀ / √d_h) v per head. Two explicit matmuls, so that a quantizer can reach their inputs
    through the identity hooks act_q, act_k, act_v, act_softmax (left FP by official Q-DiT)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.act_q, self.act_k, self.act_v, self.act_softmax = (nn.Identity() for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                            # [B, heads, T, d_h] each
        w = self.act_q(q) @ self.act_k(k).transpose(-2, -1) * self.head_dim ** -0.5     # [B, heads, T, T]
        h = self.act_softmax(w.softmax(dim=-1)) @ self.act_v(v)    # [B, heads, T, d_h]
        return self.proj(h.transpose(1, 2).reshape(B, T, D))      # heads merged: [B, T, D]


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT configures timm's Mlp) -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


#################################################################################
#                                   DiT                                         #
#################################################################################

class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition c gives (shift, scale, gate) for the attention and for the MLP
    branch; LayerNorms without affine parameters (eps 1e-6)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # [B, D] each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a Linear to p·p·out_channels per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The official constructor and defaults (DiT-XL/2 at 256 px). Weights come from a checkpoint: the
    constructor keeps PyTorch's default init (the official zero-init of adaLN only matters for training),
    and there is no label dropout (inference only; label `num_classes` is the null class of CFG)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(),
                                            nn.Linear(hidden_size, hidden_size))
        # one extra row for the null class if CFG-trained
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)
        # fixed, but stored in the checkpoint: a Parameter without gradient, as in the official model
        pos = sincos_pos_embed(hidden_size, input_size // patch_size)
        self.pos_embed = nn.Parameter(pos[None], requires_grad=False)  # [1, T, D]
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        """[B, T, p·p·C] -> [B, C, H, W]: token (i, j) holds the p×p×C patch at rows i·p…, columns j·p…."""
        B, T, _ = x.shape
        p, c, h = self.patch_size, self.out_channels, math.isqrt(T)
        x = x.reshape(B, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
        return x.reshape(B, c, h * p, h * p)

    def forward(self, x, t, y):
        """x: [B, C, H, W] latents, t: [B] timesteps of the 1000-step process (not respaced indices),
        y: [B] labels -> [B, 2C, H, W]: ε in channels :C, the variance interpolation v in C: (learn_sigma)."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        x = self.x_embedder(x) + self.pos_embed                     # [B, T, D]
        c = self.t_embedder.mlp(timestep_embedding(t)) + self.y_embedder.embedding_table(y)  # [B, D]
        for block in self.blocks:
            x = block(x, c)                                         # [B, T, D]
        return self.unpatchify(self.final_layer(x, c))              # [B, T, p·p·2C] -> [B, 2C, H, W]

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance in one batch, the official way (DiT models.py, forward_with_cfg):
        y = [labels; null labels]; only the first half of x is read, and run twice.
        ε = ε_u + s·(ε_c − ε_u) on output channels 0–2 only (the official default "for exact
        reproducibility"; channel 3 and the variance channels keep each half's own output), and the
        guided ε goes into both halves."""
        if len(x) % 2:
            raise ValueError("forward_with_cfg needs an even batch [conditional; unconditional], "
                             f"got {len(x)}")
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)           # [B, 2C, H, W]
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def eps_fn(net, y, cfg_scale=1.0):
    """ε(x_t, t) of a DiT for common.ddim_sample, for labels y [B]: the first in_channels output channels
    (DDIM never reads the variance channels). cfg_scale > 1 guides through forward_with_cfg on [x; x] with
    labels [y; null] and keeps the conditional half, as DiT's sample.py does; otherwise a plain conditional
    forward."""
    C = net.in_channels
    if cfg_scale <= 1:
        return lambda x, t: net(x, t, y)[:, :C]
    y2 = torch.cat([y, torch.full_like(y, net.num_classes)])       # [2B]: labels, then the null class
    return lambda x, t: net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y2,
                                             cfg_scale)[: len(x), :C]


def load_dit(model="dit-xl-2-256", ckpt=None):
    """The DiT of CONFIGS[model] with the weights of `ckpt` (a path or a CHECKPOINTS name; default: the
    model's own), loaded strictly, in eval mode. The official .pt files are plain state dicts;
    load_state_dict takes the "ema" entry of a train.py checkpoint."""
    if model not in CONFIGS:
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(CONFIGS)}")
    path = fetch_checkpoint(ckpt or model)
    return load_strict(DiT(**CONFIGS[model]), load_state_dict(path), path).eval()


@dataclass
class Config:
    """Sample a PNG grid from a DiT with DDIM on DiT's "even" timesteps (python -m models.dit)."""
    model: str = "dit-cifar10-small"  # dit-cifar10-small (bundled, offline), dit-xl-2-256 or dit-xl-2-512
    ckpt: str = ""                # weights: a file or a checkpoint name (default: the model's own)
    vae: str = "sd-vae-ft-mse"    # decoder of dit-xl-2 latents: a name in models/vae.py or a weights file
    n: int = 64                   # number of images
    steps: int = 50               # DDIM steps (at least 2)
    eta: float = 0.0              # DDIM eta (0: deterministic)
    cfg_scale: float = 1.5        # classifier-free guidance on channels 0-2 (DiT forward_with_cfg); 1: none
    seed: int = 0                 # image i's x_T, class label (uniform), eta noise: a generator of (seed, i)
    batch: int = 64               # images per forward (the same for any number of processes; CFG doubles it)
    device: str = "auto"          # auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)
    out: str = "samples.png"      # a PNG grid, or .npz: uint8 [N, H, W, 3] under arr_0 (ADM's convention)
    load: str = ""                # a packed integer model (export_int.py of a qdit.py rung), not --model


def main():
    """One process, or one of WORLD_SIZE under torchrun (models.sample_sharded): the same images."""
    from models import distributed, sample_sharded, save_images, vae as sd_vae  # here: `-m models.dit`
    cfg = parse_config(Config)
    if not (cfg.out.endswith((".png", ".npz")) and min(cfg.n, cfg.batch) >= 1 and cfg.steps >= 2
            and cfg.eta >= 0 and cfg.cfg_scale >= 1):
        raise UserError("need --out .png/.npz, --n/--batch >= 1, --steps >= 2, --eta >= 0, --cfg-scale >= 1")
    _, world, device = distributed(cfg.device)
    seq, abar = ddim_timesteps("even", cfg.steps), linear_alphas_cumprod()
    if cfg.load:                                                    # integer kernels (models/intq.py)
        from models import intq
        net, header, _ = intq.load_int_model(cfg.load)
        if header["model"] not in CONFIGS:
            raise UserError(f"{cfg.load}: a packed {header['model']}; sample it with python -m models.ddpm")
        cfg.model = header["model"]
    else:
        net = load_dit(cfg.model, cfg.ckpt or None)
    net, size = net.to(device), CONFIGS[cfg.model]["input_size"]
    decode = (sd_vae.load_vae(*(cfg.vae, None) if cfg.vae in sd_vae.CONFIGS else ("sd-vae-ft-mse", cfg.vae))
              if net.in_channels == 4 else nn.Identity()).to(device)       # latents: the SD VAE, as qdit.py

    def sample(x, gens, idx):                                       # labels: image i's generator, after x_T
        y = torch.cat([torch.randint(net.num_classes, (1,), generator=g) for g in gens]).to(device)
        return decode(ddim_sample(eps_fn(net, y, cfg.cfg_scale), x.to(device), seq, abar, eta=cfg.eta,
                                  generator=gens))
    t0 = time.time()
    images = sample_sharded(sample, cfg.n, (net.in_channels, size, size), seed=cfg.seed, batch=cfg.batch)
    if save_images(images, cfg.out):
        print(f"{cfg.n} images, DDIM-{cfg.steps}, {world} process(es), {time.time() - t0:.1f} s -> {cfg.out}")


if __name__ == "__main__":
    run_main(main)
