"""
DilateQuant: quantization-aware training of diffusion models at close to PTQ cost (Liu, Li, Gu et al.,
arXiv 2409.14307; code BienLuky/DilateQuant). Spec: ../shared/specs/dilatequant.md. Three parts:

  §2  Weight Dilation (WD, Eqs. 10-12): per-input-channel s >= 1 from the weights alone, X/s and W·s,
      chosen so that every output channel's weight min/max (hence Δ_w, z_w) is exactly unchanged.
  §3  Temporal Parallel Quantizer (TPQ, Eqs. 13-14): one activation (Δ_x^t, z_x^t) row per sampling
      step, gathered per sample, so one mini-batch trains many steps at once.
  §4  Block-wise Knowledge Distillation (BKD, Eq. 15): block by block in execution order, MSE between
      the FP block output and the quantized block fed by the already-quantized prefix; trains the
      weights, Δ_w and the TPQ tables.
  §5  Not in the paper, on by default (--no-eps-correct turns it off): PTQD's per-step correction of the
      part of the ε error that is proportional to ε, without which MSE-distilled models sample noise.

One run compares, on the same calibration data and the same sampling noise: FP, naive min-max PTQ
(the floor), DilateQuant, and the ablations asked for (Table 3). It prints a table and writes
results.json, a PNG grid per variant and each quantized model's state (sample it again with --load).

    python dilatequant.py --bits 4                            # bundled model, quick preset (2-core CPU)
    python dilatequant.py --bits 4 --ablate wd,tpq            # + Table 3's ablations
    python dilatequant.py --model ddpm-cifar10 --bits 4       # the paper's setting (GPU; --ref for FID)
    python dilatequant.py --load runs/dilatequant/dilatequant.safetensors   # sample a saved model again
"""
import copy
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (QuantConv2d, QuantLinear, Quantizer, UserError, ddim_sample, ddim_timesteps, fake_quant,
                    linear_alphas_cumprod, load_saved, load_strict, lp_search_range, minmax_range, parse_config,
                    pick_device, psnr, replace_modules, round_ste, run_main, save_grid, save_safetensors,
                    seed_everything, set_quant, write_record)
from models.ddpm import AttnBlock, Downsample, ResnetBlock, Upsample, load_unet

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration: the paper's settings (spec §4.3, §5.1), and a quick preset for the bundled model

@dataclass
class Config:
    """DilateQuant (arXiv 2409.14307) on a DDPM UNet: FP vs naive PTQ vs DilateQuant in one run."""
    model: str = "ddpm-cifar10-small"  # ddpm-cifar10-small (bundled, offline) or ddpm-cifar10 (the paper's)
    ckpt: str = ""                 # weights file for --model (default: the model's own checkpoint)
    bits: int = 4                  # W and A bits (paper: W4A4, W6A6)
    w_bits: int = 0                # weight bits, overrides --bits (0: use --bits)
    a_bits: int = 0                # activation bits, overrides --bits (0: use --bits)
    sm_bits: int = 8               # bits of the softmax-probability input of attention (spec D9, EDA-DM: 8)
    first_last_8bit: bool = True   # EDA-DM's policy (spec D2): 8-bit temb.dense.0 / conv_out weights, FP conv_out input
    split: bool = True             # shortcut split: two TPQ tables for cat([h, skip]) of up-path shortcuts (spec D9)
    steps: int = 100               # DDIM steps, quad sequence, eta 0 (EDA-DM's CIFAR-10 setting) = TPQ rows T
    calib: int = 5120              # calibration samples (x_t, t, step), random over FP trajectories (§4.3)
    calib_traj: int = 256          # FP trajectories the calibration samples are drawn from
    iters: int = 5000              # BKD iterations per block (§4.3, per block as EDA-DM)
    batch: int = 32                # BKD batch size (§4.3)
    lr_q: float = 1e-4             # Adam LR of Δ_w, Δ_x^t, z_x^t (§4.3)
    lr_w: float = 1e-5             # Adam LR of the weights (paper: 1e-2, destructive on raw weights: spec D1)
    eps_correct: bool = True       # divide ε̂ by its per-step correlated scale k_t (PTQD; not in the paper: §5 below)
    ablate: str = ""               # extra variants, comma-separated: wd (no WD), tpq (one row for all steps), bkd (no BKD)
    n: int = 50000                 # samples per variant for FID / PSNR / the grid (paper: 50k)
    eval_batch: int = 500          # images per forward without gradients (sampling, caching, scoring)
    ref: str = ""                  # FID reference statistics .npz (eval_fid.py --save-stats); empty: no FID
    seed: int = 0                  # seed of calibration, training and (seed + 1) sampling noise
    device: str = "auto"           # auto, cpu or cuda
    out: str = "runs/dilatequant"  # results.json, grids, saved quantized models
    load: str = ""                 # a saved quantized model (.safetensors from --out): FP vs it, no training


# Defaults follow the model: the paper's settings for its checkpoint, a preset sized for a 2-core CPU
# (<= 10 min for `--bits 4`) for the bundled one. Flags given on the command line win.
PRESETS = {
    "ddpm-cifar10-small": dict(steps=20, calib=512, calib_traj=64, iters=160, n=256, eval_batch=64,
                               ref=os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")),
    "ddpm-cifar10": dict(steps=100, calib=5120, calib_traj=256, iters=5000, n=50000, eval_batch=500, ref=""),
}


# -----------------------------------------------------------------------------
# §2 Weight Dilation (Eqs. 10-12)

@torch.no_grad()
def dilation_scales(W):
    """s [C_in] for a weight [C_out, C_in, ...] (Eqs. 10-12). An in-channel k that holds some output
    channel's max or min (the saturated set A) keeps s_k = 1; any other column is stretched until its
    first element touches its output channel's bound: s_k = min(s_k+, s_k-) with
    s_k+ = min_{j,κ: W>0} W_max,j / W[j,k,κ] and s_k- = min_{j,κ: W<0} W_min,j / W[j,k,κ].
    The bounds include 0, as the weight quantizer's range does (spec §6.2)."""
    O, I = W.shape[:2]
    Wf = W.reshape(O, I, -1).float()                                # [O, I, K]
    wmax = Wf.amax((1, 2), keepdim=True).clamp(min=0)               # [O, 1, 1]
    wmin = Wf.amin((1, 2), keepdim=True).clamp(max=0)
    inf = torch.tensor(float("inf"), device=W.device)
    # zero weights set no bound: masked to +inf, never divided (spec §6.1, reviewer 4)
    s_pos = torch.where(Wf > 0, wmax / Wf, inf).amin((0, 2))        # [I]
    s_neg = torch.where(Wf < 0, wmin / Wf, inf).amin((0, 2))
    s = torch.minimum(s_pos, s_neg)
    A = torch.zeros(I, dtype=torch.bool, device=W.device)
    A[Wf.amax(2).argmax(1)] = True                                  # in-channel of each row's max
    A[Wf.amin(2).argmin(1)] = True                                  # ... and of each row's min
    s[A] = 1.0                                                      # explicit, against ratios of 1 ± ulp
    s[~torch.isfinite(s)] = 1.0                                     # all-zero column: nothing to stretch
    return s.clamp(min=1.0)


@torch.no_grad()
def dilate(W, s):
    """W' = W ⊙ s along the input channels. W·(W_max/W) can land one ulp outside [W_min, W_max];
    clamping to the row's own bounds keeps every output channel's min/max bit for bit."""
    shape = (1, -1) + (1,) * (W.dim() - 2)
    Wf = W.reshape(W.shape[0], -1)
    lo, hi = Wf.amin(1).clamp(max=0), Wf.amax(1).clamp(min=0)       # [O]
    shape_o = (-1,) + (1,) * (W.dim() - 1)
    return torch.minimum(torch.maximum(W * s.view(shape), lo.view(shape_o)), hi.view(shape_o))


class Dilated(nn.Module):
    """A quantized conv/linear fed X/s: Q_x(X/s) ⊛ Q_w(W·s) (route (a) of spec §2.5: the 1/s cannot be
    folded through SiLU, so it is applied just before the activation quantizer). s is a fixed buffer."""

    def __init__(self, layer, s):
        super().__init__()
        self.layer = layer
        self.register_buffer("s", s.view((1, -1, 1, 1) if isinstance(layer, QuantConv2d) else (-1,)))

    def forward(self, x):
        return self.layer(x * self.s.reciprocal())                   # a product: division is ~3x slower on CPU


# -----------------------------------------------------------------------------
# §3 Temporal Parallel Quantizer (Eqs. 13-14)

class TPQ(nn.Module):
    """Activation quantizer with one (Δ_x^t, z_x^t) row per sampling step t and head h (Eq. 13):
    Q(x) = Δ_x^t (clip(round(x/Δ_x^t) + z_x^t, 0, 2^b − 1) − z_x^t). Each sample gathers the row of its
    own step index `t_idx` (Eq. 14), so a mini-batch may mix steps and every row in it gets gradients.
    The index is the position in the sampler's sequence, set by set_step(); with T = 1 every step
    shares row 0 (ablation and naive PTQ). Heads are folded into the batch, b-major ([B·H, ...])."""

    def __init__(self, bits, T, heads=1):
        super().__init__()
        self.bits, self.on, self.t_idx, self.seen = bits, False, None, None
        self.delta = nn.Parameter(torch.ones(T, heads))               # Δ_x [T, H]
        self.zero = nn.Parameter(torch.zeros(T, heads))               # z_x [T, H], rounded in use (spec §6.7)

    def forward(self, x):
        if self.seen is not None:                                    # calibration: keep range + a subsample
            v = x.detach().flatten()
            self.seen.append((v.min(), v.max(), v[torch.randint(len(v), (min(len(v), 4096),))]))
        if not self.on:
            return x
        idx = self.t_idx if len(self.delta) > 1 else torch.zeros_like(self.t_idx)
        shape = (-1,) + (1,) * (x.dim() - 1)
        delta, zero = self.delta[idx].reshape(shape), self.zero[idx].reshape(shape)   # [B·H, 1, ...]
        qmax, zero = 2 ** self.bits - 1, torch.clamp(round_ste(zero), 0, 2 ** self.bits - 1)
        if not torch.is_grad_enabled():                              # sampling: the same arithmetic, in place,
            return x.mul(delta.reciprocal()).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(delta)  # ×1/Δ
        return fake_quant(x, delta, zero, 0, qmax)

    @torch.no_grad()
    def set_row(self, t, lo, hi):
        """Row t (all heads) from a range [lo, hi] that includes 0, as EDA-DM's quantizer."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        delta = max((hi - lo) / (2 ** self.bits - 1), 1e-8)
        self.delta[t], self.zero[t] = delta, min(max(round(-lo / delta), 0), 2 ** self.bits - 1)

    @torch.no_grad()
    def clamp_(self):  # after each optimizer step: Δ > 0, z on the integer grid's range (spec §6.6-7)
        self.delta.clamp_(min=1e-8), self.zero.clamp_(0, 2 ** self.bits - 1)


class SplitTPQ(nn.Module):
    """Shortcut split (Q-Diffusion, EDA-DM): an input cat([h, skip]) gets one TPQ per half."""

    def __init__(self, bits, T, split):
        super().__init__()
        self.split, self.h, self.skip = split, TPQ(bits, T), TPQ(bits, T)

    def forward(self, x):
        return torch.cat([self.h(x[:, :self.split]), self.skip(x[:, self.split:])], dim=1)


def set_step(model, t_idx):
    """Tell every TPQ the step index of each sample in the batch, t_idx [B] (spec D10)."""
    model.t_idx = t_idx                                              # for the ε correction (§5)
    for m in model.modules():
        if isinstance(m, TPQ):
            m.t_idx = t_idx


def switch(model, on):
    """Quantization on (weights and activations) or off (the dilated model in full precision). Every
    layer always calls its TPQ, which passes x through when off (and can still record it)."""
    set_quant(model, on, True)
    for m in model.modules():
        if isinstance(m, TPQ):
            m.on = on


# -----------------------------------------------------------------------------
# The quantized model: every conv/linear (per-out-channel weights, TPQ inputs) and the attention
# matmul inputs (spec §1.3); norms, SiLU, softmax itself, residuals and resampling stay FP.

def quantize(fp, w_bits, a_bits, sm_bits, T, wd=True, split=True, first_last_8bit=True, steps=None):
    """A copy of `fp` with fake quantizers; weights dilated when wd (spec §2.6: s from the FP weights,
    then W <- W·s, then the min-max weight range, which WD leaves as it was). T: TPQ rows (1 or the
    sampler's steps); steps: the sampler's steps, one ε correction k_t each (§5; default T)."""
    q = copy.deepcopy(fp)
    names = [n for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    splits = {f"{n}.nin_shortcut": m.split for n, m in q.named_modules() if isinstance(m, ResnetBlock) and m.split}
    # EDA-DM (spec §1.3): the first and last weight quantizers in registration order (temb.dense.0,
    # conv_out) at 8 bit, conv_out's input in FP, and the input of the last layer of up[0] (the last
    # to run before conv_out) at 8 bit.
    first, last = names[0], names[-1]
    last_act = ([n for n in names if n.startswith("up.0.")] or [None])[-1]

    def make(name, layer):
        fl = first_last_8bit and name in (first, last)
        aq = None
        if not (first_last_8bit and name == last):
            ab = 8 if first_last_8bit and name == last_act else a_bits
            aq = SplitTPQ(ab, T, splits[name]) if split and name in splits else TPQ(ab, T)
        s = dilation_scales(layer.weight) if wd and aq is not None else torch.ones(layer.weight.shape[1], device=layer.weight.device)
        layer.weight.data = dilate(layer.weight.data, s)
        wq = Quantizer(8 if fl else w_bits, "channel", include_zero=True)
        wq.set_range(*minmax_range(wq.rows(layer.weight.data)))    # min-max per out channel (spec D5)
        wrap = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        return Dilated(wrap.from_float(layer, wq.make_learnable(), aq), s)

    replace_modules(q, lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear)), make)
    for m in q.modules():                                            # QK^T and softmax·V inputs
        if isinstance(m, AttnBlock):
            m.act_q, m.act_k, m.act_v = TPQ(a_bits, T), TPQ(a_bits, T), TPQ(a_bits, T)
            m.act_softmax = TPQ(sm_bits, T)
    q.register_buffer("eps_k", torch.ones(steps or T))              # §5: ε̂ / k_t, ones until measured
    return q.to(next(fp.parameters()).device)                        # the new Δ, z tables join fp's device


@torch.no_grad()
def init_tpq(q, calib, T, search=True, batch=256):
    """Every TPQ row t from the calibration activations of step t, after WD (spec §3.4, D6): EDA-DM's
    L_p-2.4 range search (on all extremes plus a random subsample), or min-max with search=False.
    With T = 1 one row sees all steps. Rows no calibration sample reached take the all-step range."""
    tpqs = [m for m in q.modules() if isinstance(m, TPQ)]
    switch(q, False)
    groups = [torch.arange(len(calib["x"]))] if T == 1 else [torch.nonzero(calib["idx"] == t)[:, 0] for t in range(T)]
    if any(len(sel) == 0 for sel in groups):
        groups.append(torch.arange(len(calib["x"])))                 # the all-step fallback, last
    ranges = []
    for sel in tqdm(groups, desc="init TPQ", leave=False):
        if len(sel) == 0:
            ranges.append(None)
            continue
        for m in tpqs:
            m.seen = []
        for b in sel.split(batch):
            q(calib["x"][b], calib["t"][b])
        row = []
        for m in tpqs:
            lo, hi = min(s[0] for s in m.seen).item(), max(s[1] for s in m.seen).item()
            if search:
                v = torch.cat([m.seen[0][2].new_tensor([lo, hi])] + [s[2] for s in m.seen])
                lo_, hi_ = lp_search_range(v[None], m.bits, [i / 100 for i in range(1, 101)], symmetric_range=True)
                lo, hi = lo_.item(), hi_.item()
            row.append((lo, hi))
            m.seen = None
        ranges.append(row)
    for t in range(T):
        for m, (lo, hi) in zip(tpqs, ranges[t] or ranges[-1]):
            m.set_row(t, lo, hi)


# -----------------------------------------------------------------------------
# Calibration data (§4.4): FP sampling trajectories, samples drawn at random across steps

@torch.no_grad()
def calibration_set(fp, cfg, seq, abar, device, generator):
    """`calib` random (x_t, t, step index) from `calib_traj` FP DDIM trajectories (data-free)."""
    xs, ts, idxs = [], [], []
    noise = torch.randn(cfg.calib_traj, 3, 32, 32, generator=generator).to(device)
    for xb in tqdm(noise.split(cfg.eval_batch), desc="FP trajectories", leave=False):
        _, traj = ddim_sample(fp, xb, seq, abar, trajectory=True)
        for x, t, i in traj:
            xs.append(x), ts.append(torch.full((len(x),), float(t))), idxs.append(torch.full((len(x),), i))
    x, t, idx = torch.cat(xs), torch.cat(ts), torch.cat(idxs)
    pick = torch.randperm(len(x), generator=generator)[:cfg.calib]
    return dict(x=x[pick].to(device), t=t[pick].to(device), idx=idx[pick].to(device))


# -----------------------------------------------------------------------------
# §4 Block-wise Knowledge Distillation (Eq. 15)

class _Stop(Exception):
    pass


def blocks_in_order(model):
    """The distillation units in execution order (spec §4.2, Q-Diffusion/BRECQ split): each ResnetBlock,
    AttnBlock, Down/Upsample, and each quantized layer outside them (conv_in, temb.dense, conv_out)."""
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, (ResnetBlock, AttnBlock, Downsample, Upsample))]
    units += [(n, m) for n, m in model.named_modules() if isinstance(m, Dilated)
              and not any(n.startswith(u + ".") for u, _ in units)]
    order, hooks = [], [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n, m in units]
    p = next(model.parameters())
    set_step(model, torch.zeros(1, dtype=torch.long, device=p.device))
    with torch.no_grad():
        model(torch.zeros(1, 3, model.resolution, model.resolution, device=p.device), torch.zeros(1, device=p.device))
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(order))


@torch.no_grad()
def block_io(model, block, calib, batch, want_output):
    """The inputs (and output) of `block` over the calibration set; the forward stops at the block."""
    ins, outs = [], []

    def hook(m, args, out):
        ins.append([a.detach() for a in args]), outs.append(out.detach() if want_output else None)
        raise _Stop

    h = block.register_forward_hook(hook)
    for b in torch.arange(len(calib["x"])).split(batch):
        set_step(model, calib["idx"][b])
        try:
            model(calib["x"][b], calib["t"][b])
        except _Stop:
            pass
    h.remove()
    return [torch.cat(a) for a in zip(*ins)], (torch.cat(outs) if want_output else None)


def distill_block(block, q_in, target, t_idx, iters, batch, lr_w, lr_q, generator):
    """Eq. 15 for one block: Adam on its weights w (lr_w) and its Δ_w, Δ_x^t, z_x^t (lr_q), both LRs
    annealed to 0 by a cosine (spec D4). Each mini-batch of cached inputs brings its own step indices,
    so the TPQ rows of all steps in it train together. Returns the first and last mini-batch losses."""
    layers = [m.layer for m in block.modules() if isinstance(m, Dilated)]
    weights = [m.weight.requires_grad_(True) for m in layers]
    qparams = [m.wq.delta for m in layers] + [p for m in block.modules() if isinstance(m, TPQ) for p in (m.delta, m.zero)]
    opt = torch.optim.Adam([dict(params=weights, lr=lr_w), dict(params=qparams, lr=lr_q)])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    losses = []
    for _ in range(iters):
        b = torch.randint(len(target), (batch,), generator=generator).to(target.device)
        set_step(block, t_idx[b])
        loss = F.mse_loss(block(*[a[b] for a in q_in]), target[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        for m in block.modules():
            if isinstance(m, TPQ):
                m.clamp_()
            elif isinstance(m, Quantizer):
                m.delta.data.clamp_(min=1e-8)
        losses.append(loss.item())
    for p in weights + qparams:
        p.requires_grad_(False)                                      # frozen from here on
    return (losses[0], losses[-1]) if losses else (None, None)


def bkd(fp, q, calib, cfg, generator):
    """Block k = 1..K in execution order: the target is the FP network's block-k output, the input the
    quantized network's own block-k input (the already distilled prefix: Eq. 15's B̂_k∘…∘B̂_1)."""
    fp_mods, q_mods = dict(fp.named_modules()), dict(q.named_modules())
    switch(q, True)
    log = []
    for name in tqdm(blocks_in_order(q), desc="BKD"):
        _, target = block_io(fp, fp_mods[name], calib, cfg.eval_batch, want_output=True)   # FP block output
        q_in, _ = block_io(q, q_mods[name], calib, cfg.eval_batch, want_output=False)      # quantized-prefix input
        first, last = distill_block(q_mods[name], q_in, target, calib["idx"], cfg.iters, cfg.batch, cfg.lr_w,
                                    cfg.lr_q, generator)
        log.append(dict(block=name, loss_first=first, loss_last=last))
    return log


# -----------------------------------------------------------------------------
# §5 (not in the paper) The correlated part of the ε error, PTQD's correction (He et al., NeurIPS 2023)
#
# A quantized denoiser's error splits into a part along ε_FP and a residual: ε̂ = k_t ε_FP + r. MSE
# training shrinks the prediction (k_t < 1: regressing through noisy, quantized inputs attenuates), and
# DDIM amplifies a scale error where the noise is high: x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t with √ᾱ_t ≈ 0.04
# at the first steps, so 8 % too little ε leaves 2x the signal's size of noise in x̂_0 and the trajectory
# diverges. Measured on the bundled model at W4A4 after BKD: k_t = 0.92 at every high-noise step; samples
# with std 2.1 (FP 0.44) and PSNR 10.6 dB; divided by k_t, 0.96 and 17.3 dB (naive PTQ: 13.3 dB). The
# same k_t is measured for every quantized variant, naive PTQ included, so the comparison stays fair.

@torch.no_grad()
def correlated_scale(q, calib, eps_fp, T, batch=256):
    """k_t = <ε̂, ε_FP> / <ε_FP, ε_FP> over the calibration samples of step t, one per sampler step even
    when the quantizer has one TPQ row (the shrinkage is largest at the low-noise steps, and one pooled k
    would over-correct the high-noise steps that matter most)."""
    num, den = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for b in torch.arange(len(calib["x"])).split(batch):
        set_step(q, calib["idx"][b])
        e_q, e = q(calib["x"][b], calib["t"][b]).flatten(1), eps_fp[b].flatten(1)
        row = calib["idx"][b]
        num.index_add_(0, row.cpu(), (e_q * e).sum(1).double().cpu())
        den.index_add_(0, row.cpu(), (e * e).sum(1).double().cpu())
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.ones_like(den)).float()


def denoiser(q):
    """ε̂(x_t, t) / k_t at the step index given to set_step (k_t = 1: uncorrected)."""
    def eps(x, t):
        k = q.eps_k[q.t_idx]
        return q(x, t) / k.view(-1, 1, 1, 1)
    return eps


# -----------------------------------------------------------------------------
# Evaluation: samples from the same noise, ε-MSE vs FP, PSNR vs FP samples, FID when possible

@torch.no_grad()
def predict(net, data, batch, quantized):
    """The network's own ε̂ (no correction) on data = dict(x, t, idx), in batches."""
    out = []
    for b in torch.arange(len(data["x"])).split(batch):
        if quantized:
            set_step(net, data["idx"][b])
        out.append(net(data["x"][b], data["t"][b]))
    return torch.cat(out)


def eps_fn(net, quantized):
    def f(x, t, idx):
        if quantized:
            set_step(net, idx)
        return denoiser(net)(x, t) if quantized else net(x, t)
    return f


@torch.no_grad()
def sample(net, noise, seq, abar, quantized, batch):
    out = []
    for xb in tqdm(noise.split(batch), desc="sampling", leave=False):
        step = (lambda i, n=len(xb): set_step(net, torch.full((n,), i, device=xb.device))) if quantized else None
        out.append(ddim_sample(denoiser(net) if quantized else net, xb, seq, abar, before_step=step).cpu())
    return torch.cat(out)


def fid_or_none(images, ref):
    if not ref:
        return None
    try:
        import eval_fid
        return eval_fid.fid_to_reference(images, ref)["fid"]
    except UserError as e:  # no Inception weights cached, or no reference: a note, not a failure
        print(f"FID skipped: {e}")
        return None


def held_out(fp, noise, seq, abar, g, batch, device):
    """The ε-MSE inputs: 512 points (x_t, t, step) drawn from the FP trajectories of the first 64 sampling noises,
    never calibration points, and the FP network's ε on them. edadm.py uses the same."""
    _, traj = ddim_sample(fp, noise[:64], seq, abar, trajectory=True)
    held = dict(x=torch.cat([x for x, _, _ in traj]).to(device),
                t=torch.cat([torch.full((len(x),), float(t)) for x, t, _ in traj]).to(device),
                idx=torch.cat([torch.full((len(x),), i) for x, _, i in traj]).to(device))
    pick = torch.randperm(len(held["x"]), generator=g)[:512]
    held = {k: v[pick] for k, v in held.items()}
    return held, predict(fp, held, batch, False)


def check_config(cfg, ablations):
    """The flags dilatequant.py and edadm.py share: bit widths, --ablate names, --steps, --calib's range.
    Returns (weight bits, activation bits, the ablations asked for)."""
    w_bits, a_bits = cfg.w_bits or cfg.bits, cfg.a_bits or cfg.bits
    for what, b in (("--bits/--w-bits", w_bits), ("--bits/--a-bits", a_bits), ("--sm-bits", cfg.sm_bits)):
        if not 2 <= b <= 8:
            raise UserError(f"{what} = {b}: bits must be within 2..8")
    ablate = [a for a in cfg.ablate.split(",") if a]
    if any(a not in ablations for a in ablate):
        raise UserError(f"--ablate {cfg.ablate!r}: choose from {', '.join(ablations)} (comma-separated)")
    if not 2 <= cfg.steps <= 1000:
        raise UserError(f"--steps {cfg.steps}: the quad DDIM sequence needs 2..1000 steps")
    if not cfg.batch <= cfg.calib <= cfg.calib_traj * cfg.steps:
        raise UserError(f"--calib {cfg.calib} must lie in [--batch {cfg.batch}, --calib-traj x --steps = "
                        f"{cfg.calib_traj * cfg.steps}] (the FP trajectories hold that many points)")
    return w_bits, a_bits, ablate


def print_table(results):
    print(f"\n{'variant':12s} {'eps-MSE vs FP':>14s} {'PSNR vs FP':>11s} {'FID':>8s} {'seconds':>8s} {'peak MB':>8s}")
    for name, r in results.items():
        fid, ps = (f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("fid", "psnr"))
        print(f"{name:12s} {r['eps_mse']:14.5f} {ps:>11s} {fid:>8s} {r['seconds']:8.0f} {r['peak_mb']:8.0f}")


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # process peak RSS (Linux: KiB)


VARIANTS = {  # name -> (WD, TPQ rows, BKD, L_p init); naive PTQ: one min-max row, no WD, no training
    "ptq": (False, False, False, False),
    "dilatequant": (True, True, True, True),
    "no_wd": (False, True, True, True),
    "no_tpq": (True, False, True, True),
    "no_bkd": (True, True, False, True),
}


def main():
    cfg = parse_config(Config, PRESETS)
    w_bits, a_bits, ablate = check_config(cfg, ("wd", "tpq", "bkd"))
    loaded = None
    if cfg.load:
        st, loaded = load_saved(cfg.load, "dilatequant")   # its config is in the file's metadata
        cfg.model, cfg.steps, w_bits, a_bits, cfg.sm_bits = (loaded[k] for k in ("model", "steps", "w_bits", "a_bits", "sm_bits"))
    seed_everything(cfg.seed)
    device, t_start = pick_device(cfg.device), time.time()
    os.makedirs(cfg.out, exist_ok=True)
    fp = load_unet(cfg.model, cfg.ckpt or None).to(device).requires_grad_(False)
    seq, abar = ddim_timesteps("quad", cfg.steps), linear_alphas_cumprod()
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.n, 3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    print(f"{cfg.model}, W{w_bits}A{a_bits} (softmax {cfg.sm_bits}), DDIM-{cfg.steps} quad, "
          f"{cfg.calib} calibration samples, {cfg.iters} BKD iterations/block, N = {cfg.n}, {device}")

    # FP: reference samples, and held-out ε-MSE inputs from its own trajectories (not the calibration ones)
    t0 = time.time()
    fp_x = sample(fp, noise, seq, abar, False, cfg.eval_batch)
    held, eps_ref = held_out(fp, noise, seq, abar, g, cfg.eval_batch, device)
    results = {"fp": dict(eps_mse=0.0, psnr=None, fid=fid_or_none(fp_x, cfg.ref), seconds=time.time() - t0,
                          peak_mb=peak_mb(device))}
    save_grid(fp_x[:64], os.path.join(cfg.out, "grid_fp.png"))

    names = ["loaded"] if loaded else ["ptq", "dilatequant"] + [f"no_{a}" for a in ablate]
    calib = None if loaded else calibration_set(fp, cfg, seq, abar, device, g)
    calib_eps = None if loaded else predict(fp, calib, cfg.eval_batch, False)   # ε_FP of the calibration set (§5)
    for name in names:
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wd, tpq, train, search = ((loaded["wd"], loaded["tpq"], False, False) if loaded else VARIANTS[name])
        q = quantize(fp, w_bits, a_bits, cfg.sm_bits, cfg.steps if tpq else 1, wd, cfg.split, cfg.first_last_8bit,
                     steps=cfg.steps)
        log = None
        if loaded:
            load_strict(q, {k: v.to(device) for k, v in st.items()}, cfg.load)
        else:
            init_tpq(q, calib, cfg.steps if tpq else 1, search=search, batch=cfg.eval_batch)
            log = bkd(fp, q, calib, cfg, g) if train else None
            switch(q, True)
            if cfg.eps_correct:
                q.eps_k.copy_(correlated_scale(q, calib, calib_eps, len(q.eps_k), cfg.eval_batch))
        switch(q, True)
        x = sample(q, noise, seq, abar, True, cfg.eval_batch)
        e = predict(q, held, cfg.eval_batch, True)                    # the network's own ε-MSE, and ε̂/k_t's
        results[name] = dict(eps_mse=F.mse_loss(e, eps_ref).item(),
                             eps_mse_corrected=F.mse_loss(e / q.eps_k[held["idx"]].view(-1, 1, 1, 1), eps_ref).item(),
                             psnr=psnr(x, fp_x), fid=fid_or_none(x, cfg.ref), seconds=time.time() - t0,
                             peak_mb=peak_mb(device), eps_k=q.eps_k.tolist(), bkd=log)
        save_grid(x[:64], os.path.join(cfg.out, f"grid_{name}.png"))
        if not loaded:
            meta = dict(model=cfg.model, steps=cfg.steps, w_bits=w_bits, a_bits=a_bits, sm_bits=cfg.sm_bits,
                        wd=wd, tpq=tpq, split=cfg.split, first_last_8bit=cfg.first_last_8bit,
                        eps_correct=cfg.eps_correct)
            save_safetensors(q.state_dict(), os.path.join(cfg.out, f"{name}.safetensors"),
                             metadata=dict(dilatequant=json.dumps(meta)))
        print(f"{name}: {results[name]['seconds']:.0f} s")

    print_table(results)
    write_record(os.path.join(cfg.out, "results.json"), asdict(cfg) | dict(w_bits=w_bits, a_bits=a_bits), results,
                 time.time() - t_start, device)
    print(f"results -> {os.path.join(cfg.out, 'results.json')}")


if __name__ == "__main__":
    run_main(main)
