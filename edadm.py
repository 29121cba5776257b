"""
EDA-DM: Enhanced Distribution Alignment for post-training quantization of diffusion models (Liu, Li, Xiao,
Gu et al., arXiv 2401.04585; code BienLuky/EDA-DM). Spec: ../shared/specs/edadm.md. A BRECQ/Q-Diffusion
PTQ pipeline with two changes:

  §3  TDAC, Temporal Distribution Alignment Calibration: how many calibration samples each sampler step
      gets, from a density score D (how many other steps have similar middle-block features) and a
      variety score V (how unlike all other steps a step is): n_k ∝ D̃_k + λ·Ṽ_k.
  §4  FBR, Fine-grained Block Reconstruction: block by block, AdaRound rounding variables and learned
      activation steps (QDrop on), trained on L = d(block output) + γ·Σ_l d(output of layer l in the block).

One run compares, on the same sampling noise: FP, naive min-max PTQ (the floor), a Q-Diffusion/BRECQ-style
baseline (uniform calibration over steps, block-output loss only), EDA-DM, and the ablations asked for
(--ablate tdac: uniform calibration + FBR; --ablate fbr: TDAC + block loss only). It prints a table and
writes results.json, a PNG grid per variant and each quantized model's state (sample it again with --load).

    python edadm.py --w-bits 4 --a-bits 8                    # bundled model, quick preset (2-core CPU)
    python edadm.py --bits 8 --ablate tdac,fbr               # W8A8 + both ablations
    python edadm.py --model ddpm-cifar10 --w-bits 4 --a-bits 8 --ref cifar10_train_stats.npz   # the paper's
    python edadm.py --load runs/edadm/edadm.safetensors      # sample a saved model again
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (QuantConv2d, QuantLinear, UserError, ddim_sample, ddim_timesteps, eps_mse, fake_quant,
                    linear_alphas_cumprod, load_saved, load_strict, lp_search_range, minmax_range,
                    parse_config, pick_device, psnr, quant_params, replace_modules, run_main, save_grid,
                    save_safetensors, seed_everything, set_quant, write_record)
from dilatequant import check_config, fid_or_none, held_out, peak_mb, print_table  # flags, FID, ε-MSE points, table
from models.ddpm import AttnBlock, ResnetBlock, load_unet

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration: the paper's CIFAR-10 settings (spec §3.3, §4.6, §5), a quick preset for the bundled model

@dataclass
class Config:
    """EDA-DM (arXiv 2401.04585) on a DDPM UNet: FP vs naive PTQ vs BRECQ-style vs EDA-DM in one run."""
    model: str = "ddpm-cifar10-small"  # ddpm-cifar10-small (bundled, offline) or ddpm-cifar10 (the paper's)
    ckpt: str = ""                 # weights file for --model (default: the model's own checkpoint)
    bits: int = 8                  # W and A bits (the released scripts: W8A8 and W4A8, spec §2.2)
    w_bits: int = 0                # weight bits, overrides --bits (0: use --bits)
    a_bits: int = 0                # activation bits, overrides --bits (0: use --bits)
    sm_bits: int = 8               # bits of the softmax-probability input of attention (spec §2.2)
    first_last_8bit: bool = True   # official quirk (§2.6, D1): 8-bit temb.dense.0/conv_out weights, conv_out input FP
    split: bool = True             # shortcut split: own quantizers for both halves of cat([h, skip]) (spec §2.5)
    steps: int = 100               # DDIM steps, quad sequence, eta 0 (spec §5)
    calib: int = 1024              # N, calibration samples (spec §3.3)
    calib_traj: int = 1024         # B, FP trajectories behind them (spec §3.3; N > B reuses them, §3.2 step 9)
    lam: float = 1.2               # λ, weight of the variety score against the density score (spec §3.3, D7)
    radius: float = 3.0            # r, density radius on the mean squared feature distance (spec §3.3, D4)
    gamma: float = 0.8             # γ, weight of the layer losses in FBR (spec §4.6, D7)
    iters: int = 5000              # reconstruction iterations per unit (spec §4.6)
    batch: int = 32                # reconstruction batch (spec §4.6)
    lr_w: float = 0.0              # Adam LR of the rounding variables (0: the paper's, 5e-2 at W8, 5e-1 below: §4.6)
    lr_a: float = 0.0              # Adam LR of the activation steps (0: the paper's, 1e-3 at W8, 5e-4 below: §4.6)
    qdrop: float = 0.5             # QDrop: probability that an element is quantized while its unit trains (§4.5)
    round_reg: float = 0.0         # AdaRound regulariser weight, β 20 -> 2 after 20 % warm-up (official: off, §4.3, D6)
    ablate: str = ""               # extra variants, comma-separated: tdac (uniform calibration), fbr (block loss only)
    n: int = 50000                 # samples per variant for FID / PSNR / the grid (paper: 50k)
    eval_batch: int = 500          # images per forward without gradients: sampling, caching (paper: 500)
    ref: str = ""                  # FID reference statistics .npz (eval_fid.py --save-stats); empty: no FID
    seed: int = 1234               # seed of trajectories, selection, reconstruction and (seed + 1) sampling noise (§5)
    device: str = "auto"           # auto, cpu or cuda
    out: str = "runs/edadm"        # results.json, grids, saved quantized models
    load: str = ""                 # a saved quantized model (.safetensors from --out): FP vs it, no calibration


# Defaults follow the model: the paper's settings for its checkpoint; for the bundled one a preset sized for a
# 2-core CPU (<= 10 min for `--w-bits 4 --a-bits 8` on one thread): DDIM-10, 96 calibration samples from 48
# trajectories, 30 iterations per unit, 192 samples. r is scale dependent (D4): at r = 3.0 nearly every pair of
# the bundled model's 10 steps is "dense" (D = 8-9 everywhere); r = 0.2 gives D = 0 at both ends and a peak
# mid-trajectory, the shape of the official figure (spec §3.1), and counts 0.4-1.6x the mean (the figure: 3-18
# around 10.24). γ stays the paper's 0.8 here: on this model the layer terms raise ε-MSE at every γ tried (README).
PRESETS = {
    "ddpm-cifar10-small": dict(steps=10, calib=96, calib_traj=48, iters=30, n=192, eval_batch=64, radius=0.2,
                               ref=os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")),
    "ddpm-cifar10": dict(steps=100, calib=1024, calib_traj=1024, iters=5000, n=50000, eval_batch=500, ref=""),
}
GRID = [i / 100 for i in range(1, 101)]                             # the L_p search's 100 clipping ratios (§2.4)
ZETA, GAMMA_R = 1.1, -0.1                                            # rectified sigmoid's stretch (AdaRound, §4.3)


# -----------------------------------------------------------------------------
# §2 Quantizers: per-output-channel weights with learned rounding, per-tensor activations with a learned step

class AdaRound(nn.Module):
    """Weight quantizer, one fixed (Δ_w, z_w) per output channel (spec §2.3-2.4: L_p-2.4 search over 100
    symmetric thresholds, or min-max for naive PTQ). With split > 0 the input channels [:split] and [split:]
    have their own (Δ_w, z_w) per output channel (spec §2.5). Rounding (spec §4.3): nearest while V is None;
    with rounding variables V, ŵ = Δ_w·(clamp(⌊w/Δ_w⌋ + h(V) + z_w, 0, 2^b − 1) − z_w), h soft while the
    unit trains and 1[V ≥ 0] after."""

    def __init__(self, w, bits, search, split=0):
        super().__init__()
        self.bits, self.soft, self.V = bits, False, None
        O, parts, deltas, zeros = w.shape[0], ([w] if not split else [w[:, :split], w[:, split:]]), [], []
        for p in parts:
            rows = p.reshape(O, -1)                                  # [O, I·K]
            lo, hi = lp_search_range(rows, bits, GRID, symmetric_range=True) if search else minmax_range(rows)
            d, z = quant_params(lo, hi, bits)                        # [O, 1]
            deltas.append(d.expand(O, p.shape[1] if split else 1)), zeros.append(z.expand_as(deltas[-1]))
        shape = (O, -1) + (1,) * (w.dim() - 2)                      # [O, 1 or I, 1, 1]
        self.register_buffer("delta", torch.cat(deltas, 1).reshape(shape).contiguous())
        self.register_buffer("zero", torch.cat(zeros, 1).reshape(shape).contiguous())

    def h(self):  # rectified sigmoid h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA_R) + GAMMA_R, 0, 1)

    @torch.no_grad()
    def init_rounding(self, w):
        """V with h(V) = ρ = w/Δ_w − ⌊w/Δ_w⌋, so the soft weight starts at the FP weight (spec §4.3)."""
        rho = w / self.delta - torch.floor(w / self.delta)            # [O, I, k, k] in [0, 1)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA_R) / (rho - GAMMA_R) - 1))

    def forward(self, w):
        qmax = 2 ** self.bits - 1
        if self.V is None:
            return fake_quant(w, self.delta, self.zero, 0, qmax)
        up = self.h() if self.soft else (self.V >= 0).to(w.dtype)    # hard: 0 or 1 after reconstruction
        return (torch.clamp(torch.floor(w / self.delta) + up + self.zero, 0, qmax) - self.zero) * self.delta


class ActQuant(nn.Module):
    """Per-tensor activation quantizer (spec §2.3) with a learnable step Δ_a and a fixed zero point z_a (§4.3).
    While calibrating it re-runs the L_p search on every batch and keeps a running range R <- 0.9 R + 0.1 R_new
    (spec §2.4 step 5), or the overall min/max (naive PTQ). `keep` < 1 is QDrop (§4.5 step 2): each element
    is quantized with probability `keep`, passed in FP otherwise."""

    def __init__(self, bits):
        super().__init__()
        self.bits, self.on, self.keep, self.calibrating, self.search, self.range = bits, False, 1.0, False, True, None
        self.delta = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0.0))

    @torch.no_grad()
    def observe(self, x):
        v = x.detach().flatten()
        lo, hi = v.min(), v.max()
        if self.search:  # on the extremes and a 16k subsample: the search over all of a 256-image batch is slow on CPU
            sub = torch.cat([torch.stack([lo, hi]), v[torch.randint(len(v), (min(len(v), 16384),), device=v.device)]])
            lo, hi = (r[0, 0] for r in lp_search_range(sub[None], self.bits, GRID, symmetric_range=True))
            old = self.range or (lo, hi)
            self.range = (0.9 * old[0] + 0.1 * lo, 0.9 * old[1] + 0.1 * hi)   # (lo, hi) on the first batch
        else:
            old = self.range or (lo, hi)
            self.range = (torch.minimum(old[0], lo), torch.maximum(old[1], hi))
        delta, zero = quant_params(*self.range, self.bits)
        self.delta.copy_(delta), self.zero.copy_(zero)

    def forward(self, x):
        if self.calibrating:
            self.observe(x)
        if not self.on:
            return x
        qmax = 2 ** self.bits - 1
        if not torch.is_grad_enabled():                              # sampling: the same arithmetic, in place
            return x.div(self.delta).round_().add_(self.zero).clamp_(0, qmax).sub_(self.zero).mul_(self.delta)
        xq = fake_quant(x, self.delta, self.zero, 0, qmax)           # LSQ gradient to Δ_a
        return xq if self.keep >= 1 else torch.where(torch.rand_like(x) < self.keep, xq, x)


def switch(model, on):
    """All quantizers on (fake-quantized weights and activations) or off (the FP network)."""
    set_quant(model, on, on)
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.on = on


def quantize(fp, w_bits, a_bits, sm_bits, search, split=True, first_last_8bit=True):
    """A copy of `fp` where every conv/linear quantizes its weight per output channel and its input per tensor,
    and the attention matmul inputs q, k, v, softmax(qkᵀ) are quantized at the hook points (spec §2.1).
    Split up-path shortcuts: the two halves are quantized at the block's shortcut_h/shortcut_skip hooks
    (so nin_shortcut itself gets no input quantizer) and its weight halves get their own ranges (§2.5).
    first_last_8bit (§2.6): the first and last weight quantizers in registration order at 8 bit (temb.dense.0
    and conv_out: the official quirk), conv_out's input in FP, the second-to-last input quantizer (the last
    layer of up[0]) at 8 bit. Weight ranges are set here from the weights alone (§2.7 step 1)."""
    q = copy.deepcopy(fp)
    names = [n for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    splits = {f"{n}.nin_shortcut": m.split for n, m in q.named_modules()
              if isinstance(m, ResnetBlock) and m.split and hasattr(m, "nin_shortcut")}
    splits = splits if split else {}
    first, last = names[0], names[-1]
    last_act = ([n for n in names if n.startswith("up.0.")] or [None])[-1]
    a_bits_of = lambda name: 8 if first_last_8bit and name == last_act else a_bits

    def make(name, layer):
        wq = AdaRound(layer.weight.data, 8 if first_last_8bit and name in (first, last) else w_bits, search,
                      splits.get(name, 0))
        fp_input = (first_last_8bit and name == last) or name in splits
        wrap = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        return wrap.from_float(layer, wq, None if fp_input else ActQuant(a_bits_of(name)))

    replace_modules(q, lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear)), make)
    for name, m in q.named_modules():
        if isinstance(m, AttnBlock):                                 # QKᵀ and softmax·V inputs
            m.act_q, m.act_k, m.act_v = ActQuant(a_bits), ActQuant(a_bits), ActQuant(a_bits)
            m.act_softmax = ActQuant(sm_bits)
        if f"{name}.nin_shortcut" in splits:
            m.shortcut_h, m.shortcut_skip = (ActQuant(a_bits_of(f"{name}.nin_shortcut")) for _ in range(2))
    return q.to(next(fp.parameters()).device)


@torch.no_grad()
def init_acts(q, calib, search, batch=256):
    """Activation ranges (spec §2.7 step 2): weights fake-quantized (nearest), the calibration set forwarded in
    batches of 256; each quantizer updates its range on its input, which upstream quantizers already shaped."""
    switch(q, True)
    acts = [m for m in q.modules() if isinstance(m, ActQuant)]
    for m in acts:
        m.calibrating, m.search, m.range = True, search, None
    for b in torch.arange(len(calib["x"])).split(batch):
        q(calib["x"][b], calib["t"][b])
    for m in acts:
        m.calibrating, m.range = False, None


# -----------------------------------------------------------------------------
# §3 TDAC: FP trajectories, density and variety of the middle-block feature per step, counts per step

@torch.no_grad()
def fp_trajectories(fp, B, seq, abar, batch, generator, device):
    """B FP DDIM trajectories (spec §3.2 steps 1-2): the model input x [T_s, B, 3, H, W] of every step and the
    latent feature F [T_s, B, C, h, w], the input of the middle attention block (a forward hook on mid.attn_1).
    Steps are indexed in denoising order, k = 0 the first (noisiest) one, as in the spec."""
    xs, feats = [], []
    hook = fp.mid.attn_1.register_forward_hook(lambda m, args, out: feats[-1].append(args[0].cpu()))
    noise = torch.randn(B, 3, fp.resolution, fp.resolution, generator=generator).to(device)
    for xb in tqdm(noise.split(batch), desc="FP trajectories", leave=False):
        feats.append([])
        _, traj = ddim_sample(fp, xb, seq, abar, trajectory=True)
        xs.append(torch.stack([x for x, _, _ in traj]))              # [T_s, b, 3, H, W], k = 0..T_s−1
        feats[-1] = torch.stack(feats[-1])                           # [T_s, b, C, h, w]
    hook.remove()
    return torch.cat(xs, 1), torch.cat(feats, 1)


def tdac_scores(Fk, r):
    """Density D_k = #{j ≠ k : mean((F_k − F_j)²) ≤ r} and variety
    V_k = Σ_{j≠k} Σ_{n,h,w} (1 − cos(F_k, F_j)), the cosine over channels (spec §3.2 steps 3-4), vectorised as
    spec §3.4: the MSEs from one Gram matrix, and V_k = (T_s − 1)·B·h·w − Σ_{n,h,w} (u_k·S − u_k·u_k) with u
    the unit channel vectors and S = Σ_j u_j."""
    T = Fk.shape[0]
    flat = Fk.reshape(T, -1).double()                                # [T, P]
    G = flat @ flat.T                                                # [T, T]
    mse = (G.diag()[:, None] + G.diag()[None, :] - 2 * G) / flat.shape[1]
    D = ((mse <= r) & ~torch.eye(T, dtype=torch.bool, device=mse.device)).sum(1)   # [T]
    u = F.normalize(Fk.float(), dim=2, eps=1e-6)                     # [T, B, C, h, w]
    S = u.sum(0)                                                     # [B, C, h, w]
    cos_sum = (u * S).sum(2).double().flatten(1).sum(1) - u.pow(2).sum(2).double().flatten(1).sum(1)   # [T]
    V = (T - 1) * u[0, :, 0].numel() - cos_sum
    return D, V, mse


def largest_remainder(p, N):
    """Integer counts n_k ≈ p_k·N summing exactly to N: floors, then +1 for the largest remainders. (The official
    code rounds and then repairs the sum at the largest shares, spec §3.2 step 7; the two differ by at most 1.)"""
    exact = p.double() * N
    n = exact.floor().long()
    n[torch.argsort(exact - n, descending=True, stable=True)[:N - int(n.sum())]] += 1
    return n


def tdac_counts(D, V, lam, N):
    """n_k ∝ w_k = D̃_k + λ·Ṽ_k, D̃, Ṽ min-max normalised over the steps (spec §3.2 steps 5-7). A constant
    score normalises to 0 rather than NaN (§3.4); if both are constant every step gets N/T_s."""
    norm = lambda s: (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else torch.zeros_like(s)
    w = norm(D.double()) + lam * norm(V.double())
    return largest_remainder(w / w.sum() if w.sum() > 0 else torch.ones_like(w) / len(w), N)


def select(x, seq, counts, generator):
    """Calibration sample i is trajectory i mod B at step τ_i, τ a random permutation of n_k copies of each k
    (spec §3.2 steps 8-10); its timestep label is t_i = seq[T_s − 1 − τ_i]. Uniform counts give the
    Q-Diffusion-style set (the same number of samples from every step)."""
    tau = torch.repeat_interleave(torch.arange(len(counts)), counts)
    tau = tau[torch.randperm(len(tau), generator=generator)]         # [N]
    b = torch.arange(len(tau)) % x.shape[1]
    return dict(x=x[tau, b], t=torch.tensor([float(seq[len(seq) - 1 - k]) for k in tau]), idx=tau)


# -----------------------------------------------------------------------------
# §4 FBR: units in execution order, cached inputs/targets, the fine-grained loss, AdaRound + learned Δ_a

class _Stop(Exception):
    pass


def units_in_order(model):
    """The reconstruction units in execution order (spec §4.2): every ResnetBlock and AttnBlock (FBR loss), and
    every quantized layer outside them (temb.dense, conv_in, the resampling convs, conv_out; layer loss)."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (ResnetBlock, AttnBlock))]
    units = blocks + [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))
                      and not any(n.startswith(b + ".") for b, _ in blocks)]
    order, hooks = [], [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n, m in units]
    p = next(model.parameters())
    with torch.no_grad():
        model(torch.zeros(1, 3, model.resolution, model.resolution, device=p.device), torch.zeros(1, device=p.device))
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(order))


def inner_layers(unit):
    """FBR's layer terms (spec §4.5 step 7): the quantized layers of a block in registration order, the last one
    excluded (ResnetBlock: conv1, temb_proj [, conv2 when there is a nin_shortcut]; AttnBlock: q, k, v).
    A single-layer unit has none."""
    return [n for n, m in unit.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))][:-1]


@torch.no_grad()
def unit_io(model, unit, calib, batch, layers=()):
    """Over the calibration set: the inputs of `unit`, its output, and the outputs of its sub-layers `layers`
    (names inside the unit); the forward stops at the unit (spec §4.4)."""
    ins, outs, inner = [], [], {n: [] for n in layers}
    mods = dict(unit.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: inner[n].append(o)) for n in layers]

    def stop(m, args, out):
        ins.append(args), outs.append(out)
        raise _Stop

    hooks.append(unit.register_forward_hook(stop))
    for b in torch.arange(len(calib["x"])).split(batch):
        try:
            model(calib["x"][b], calib["t"][b])
        except _Stop:
            pass
    for h in hooks:
        h.remove()
    return [torch.cat(a) for a in zip(*ins)], torch.cat(outs), [torch.cat(inner[n]) for n in layers]


def d(a, b):
    """The reconstruction distance (spec §4.5 step 6): squared error summed over channels, mean over the rest."""
    return (a - b).pow(2).sum(1).mean()


def fbr_loss(y_hat, y, o_hat, o, gamma):
    """FBR (spec §4.5 step 7): L = d(ŷ, y) + γ·Σ_l d(ô_l, o_l). γ = 0 is BRECQ's block-output loss."""
    return d(y_hat, y) + gamma * sum((d(a, b) for a, b in zip(o_hat, o)), torch.zeros(()))


def reconstruct_unit(unit, x_fp, x_q, y_fp, layers, o_fp, gamma, iters, batch, lr_w, lr_a, keep, round_reg, generator):
    """One unit (spec §4.3-4.6): rounding variables V of its layers (Adam, lr_w) and the steps Δ_a of its
    activation quantizers (Adam, lr_a), both cosine-annealed to 0; QDrop on the input (x_q or x_fp per element,
    §4.5 step 1; the time embedding always from the quantized path) and inside (step 2). Ends hard (§4.7).
    Returns the loss of the first and the last mini-batch."""
    qlayers = [m for m in unit.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    acts = [m for m in unit.modules() if isinstance(m, ActQuant)]
    for m in qlayers:
        m.wq.init_rounding(m.weight)
        m.wq.soft = True
    opts = [torch.optim.Adam([m.wq.V for m in qlayers], lr=lr_w)]
    opts += [torch.optim.Adam([m.delta for m in acts], lr=lr_a)] if acts else []
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(iters, 1), eta_min=0.0) for o in opts]
    mods, seen = dict(unit.named_modules()), {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in layers]
    for m in acts:
        m.keep = keep
    losses = []
    for it in range(iters):
        b = torch.randperm(len(y_fp), generator=generator)[:batch].to(y_fp.device)   # without replacement
        x_in = torch.where(torch.rand_like(x_q[0][b]) < keep, x_q[0][b], x_fp[0][b])
        y_hat = unit(x_in, *[a[b] for a in x_q[1:]])
        loss = fbr_loss(y_hat, y_fp[b], [seen[n] for n in layers], [o[b] for o in o_fp], gamma)
        warm = 0.2 * iters                                           # AdaRound's β 20 -> 2 after 20 % warm-up
        if round_reg > 0 and it >= warm:
            beta = 2 + 18 * (1 - (it - warm) / max(iters - warm, 1))
            loss = loss + round_reg * sum((1 - (2 * m.wq.h() - 1).abs().pow(beta)).sum() for m in qlayers)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o, s in zip(opts, scheds):
            o.step(), s.step()
        for m in acts:
            m.delta.data.clamp_(min=1e-8)
        losses.append(loss.item())
    for h in hooks:
        h.remove()
    for m in qlayers:
        m.wq.soft = False                                            # hard rounding 1[V ≥ 0] from here on
        m.wq.V.requires_grad_(False)
    for m in acts:
        m.keep = 1.0
        m.delta.requires_grad_(False)
    return (losses[0], losses[-1]) if losses else (None, None)


def reconstruct(fp, q, calib, gamma, iters, batch, lr_w, lr_a, keep, round_reg, generator, io_batch=256):
    """Units in execution order (spec §4.2, §4.4): the FP network gives the unit's FP input x_fp, FP output y_fp
    and FP layer outputs o_l; the quantized network (finished units hard-rounded) gives its input x_q."""
    fp_mods, q_mods = dict(fp.named_modules()), dict(q.named_modules())
    log = []
    for name in tqdm(units_in_order(q), desc="reconstruct"):
        unit = q_mods[name]
        layers = inner_layers(unit) if gamma > 0 else []
        x_fp, y_fp, o_fp = unit_io(fp, fp_mods[name], calib, io_batch, layers)
        switch(q, True)
        x_q, _, _ = unit_io(q, unit, calib, io_batch)
        first, last = reconstruct_unit(unit, x_fp, x_q, y_fp, layers, o_fp, gamma, iters, batch, lr_w, lr_a, keep,
                                       round_reg, generator)
        log.append(dict(unit=name, loss_first=first, loss_last=last))
    return log


# -----------------------------------------------------------------------------
# Evaluation: samples from the same noise, ε-MSE vs FP, PSNR vs FP samples, FID when possible

@torch.no_grad()
def sample(net, noise, seq, abar, batch):
    return torch.cat([ddim_sample(net, xb, seq, abar).cpu()
                      for xb in tqdm(noise.split(batch), desc="sampling", leave=False)])


VARIANTS = {  # name -> (TDAC calibration, L_p init, reconstruction, FBR layer losses)
    "ptq": (False, False, False, False),                             # naive: min-max, nearest rounding
    "brecq": (False, True, True, False),                             # Q-Diffusion/BRECQ-style baseline
    "edadm": (True, True, True, True),
    "no_tdac": (False, True, True, True),
    "no_fbr": (True, True, True, False),
}


def main():
    cfg = parse_config(Config, PRESETS)
    w_bits, a_bits, ablate = check_config(cfg, ("tdac", "fbr"))    # bits, --ablate, --steps, --calib
    if cfg.lam < 0 or cfg.radius <= 0 or cfg.gamma < 0 or not 0 < cfg.qdrop <= 1 or cfg.iters < 0 or cfg.round_reg < 0:
        raise UserError("need --lam >= 0, --radius > 0, --gamma >= 0, 0 < --qdrop <= 1, --iters >= 0, --round-reg >= 0")
    lr_w = cfg.lr_w or (5e-2 if w_bits >= 8 else 5e-1)               # spec §4.6, DDPM CIFAR-10 row
    lr_a = cfg.lr_a or (1e-3 if w_bits >= 8 else 5e-4)
    loaded = None
    if cfg.load:
        st, loaded = load_saved(cfg.load, "edadm")   # its config is in the file's metadata
        cfg.model, cfg.steps, w_bits, a_bits, cfg.sm_bits, cfg.split, cfg.first_last_8bit = (loaded[k] for k in (
            "model", "steps", "w_bits", "a_bits", "sm_bits", "split", "first_last_8bit"))
    seed_everything(cfg.seed)
    device, t_start = pick_device(cfg.device), time.time()
    fp = load_unet(cfg.model, cfg.ckpt or None).to(device).requires_grad_(False)
    os.makedirs(cfg.out, exist_ok=True)
    seq, abar = ddim_timesteps("quad", cfg.steps), linear_alphas_cumprod()
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.n, 3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    print(f"{cfg.model}, W{w_bits}A{a_bits} (softmax {cfg.sm_bits}), DDIM-{cfg.steps} quad, N = {cfg.calib} from "
          f"{cfg.calib_traj} trajectories, λ {cfg.lam}, r {cfg.radius}, γ {cfg.gamma}, {cfg.iters} iterations/unit, "
          f"lr_w {lr_w:g}, lr_a {lr_a:g}, {cfg.n} samples, {device}")

    # FP: reference samples, and held-out ε-MSE inputs from its own trajectories (not the calibration ones)
    t0 = time.time()
    fp_x = sample(fp, noise, seq, abar, cfg.eval_batch)
    held, eps_ref = held_out(fp, noise, seq, abar, g, cfg.eval_batch, device)
    results = {"fp": dict(eps_mse=0.0, psnr=None, fid=fid_or_none(fp_x, cfg.ref), seconds=time.time() - t0,
                          peak_mb=peak_mb(device))}
    save_grid(fp_x[:64], os.path.join(cfg.out, "grid_fp.png"))

    calib, tdac = {}, None
    if not loaded:  # §3: one set of FP trajectories; TDAC and uniform counts select from the same points
        t0 = time.time()
        x_traj, feats = fp_trajectories(fp, cfg.calib_traj, seq, abar, cfg.eval_batch, g, device)
        D, V, mse = tdac_scores(feats.to(device), cfg.radius)
        counts = {True: tdac_counts(D.cpu(), V.cpu(), cfg.lam, cfg.calib),
                  False: largest_remainder(torch.ones(cfg.steps) / cfg.steps, cfg.calib)}
        calib = {k: {a: v.to(device) for a, v in select(x_traj, seq, n, g).items()} for k, n in counts.items()}
        off = mse[~torch.eye(cfg.steps, dtype=torch.bool, device=mse.device)]
        tdac = dict(D=D.tolist(), V=[round(v, 2) for v in V.tolist()], counts=counts[True].tolist(),
                    mse_quantiles=torch.quantile(off.float(), torch.tensor([0.1, 0.5, 0.9])).tolist(),
                    seconds=time.time() - t0)
        print(f"TDAC (k = 0 is the noisiest step): D {tdac['D']}\n  n_k {tdac['counts']}\n  step-pair feature MSE "
              f"10/50/90 %: {', '.join(f'{v:.3g}' for v in tdac['mse_quantiles'])} (r = {cfg.radius})")
        del x_traj, feats

    names = ["loaded"] if loaded else ["ptq", "brecq", "edadm"] + [f"no_{a}" for a in ablate]
    for name in names:
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        use_tdac, search, train, fbr = (False, False, False, False) if loaded else VARIANTS[name]
        torch.manual_seed(cfg.seed)                                  # every variant: the same QDrop/batch draws
        q = quantize(fp, w_bits, a_bits, cfg.sm_bits, search, cfg.split, cfg.first_last_8bit)
        log = None
        if loaded:
            if loaded["adaround"]:
                for m in q.modules():
                    if isinstance(m, (QuantConv2d, QuantLinear)):
                        m.wq.init_rounding(m.weight)
            load_strict(q, {k: v.to(device) for k, v in st.items()}, cfg.load)
        else:
            init_acts(q, calib[use_tdac], search)            # batches of 256 (spec §2.7)
            if train:
                log = reconstruct(fp, q, calib[use_tdac], cfg.gamma if fbr else 0.0, cfg.iters, cfg.batch, lr_w, lr_a,
                                  cfg.qdrop, cfg.round_reg, torch.Generator().manual_seed(cfg.seed), cfg.eval_batch)
        switch(q, True)
        x = sample(q, noise, seq, abar, cfg.eval_batch)
        results[name] = dict(eps_mse=eps_mse(lambda x, t, i: q(x, t), held["x"], held["t"], held["t"], eps_ref,
                                             cfg.eval_batch),
                             psnr=psnr(x, fp_x), fid=fid_or_none(x, cfg.ref), seconds=time.time() - t0,
                             peak_mb=peak_mb(device), reconstruction=log)
        save_grid(x[:64], os.path.join(cfg.out, f"grid_{name}.png"))
        if not loaded:
            meta = dict(model=cfg.model, steps=cfg.steps, w_bits=w_bits, a_bits=a_bits, sm_bits=cfg.sm_bits,
                        split=cfg.split, first_last_8bit=cfg.first_last_8bit, adaround=train, tdac=use_tdac, fbr=fbr)
            save_safetensors(q.state_dict(), os.path.join(cfg.out, f"{name}.safetensors"),
                             metadata=dict(edadm=json.dumps(meta)))
        print(f"{name}: {results[name]['seconds']:.0f} s")

    print_table(results)
    write_record(os.path.join(cfg.out, "results.json"), asdict(cfg) | dict(w_bits=w_bits, a_bits=a_bits, lr_w=lr_w,
                 lr_a=lr_a), results | ({"tdac": tdac} if tdac else {}), time.time() - t_start, device)
    print(f"results -> {os.path.join(cfg.out, 'results.json')}")


if __name__ == "__main__":
    run_main(main)
