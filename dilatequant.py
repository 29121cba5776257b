"""
DilateQuant: accurate and efficient quantization-aware training of diffusion models via Weight Dilation
(Liu, Li, Gu et al., arXiv 2409.14307, ACM MM 2025; official code github.com/BienLuky/DilateQuant, built on
BienLuky/EDA-DM). Three parts, in the order of the paper and of this file:

  - Weight Dilation (WD, Eqs. 10-12): a per-input-channel s >= 1 from the weights alone, X/s and W·s,
    as large as possible while every output channel's weight min/max (hence Δ_w, z_w) stays exactly put.
  - Temporal Parallel Quantizer (TPQ, Eqs. 13-14): one activation (Δ_x^t, z_x^t) row per sampler step,
    gathered per sample, so one mini-batch trains the rows of many steps at once.
  - Block-wise Knowledge Distillation (BKD, Eq. 15): block by block in execution order, MSE between the FP
    block output and the quantized block fed by the already distilled prefix; trains the weights, Δ_w and
    the TPQ tables.

One run compares, on the same calibration data and sampling noise: FP, naive min-max PTQ (the floor),
DilateQuant, and Table 3's ablations asked for (default: no_bkd). It prints a table and writes results.json,
a grid per variant, compare.png (FP | naive PTQ | DilateQuant) and the quantized models (see --load).

    python dilatequant.py --bits 4                          # bundled model, quick preset (2-core CPU)
    python dilatequant.py --bits 4 --ablate wd,tpq,bkd      # + Table 3's ablations
    python dilatequant.py --model ddpm-cifar10 --bits 4     # the paper's setting (GPU; --ref for FID)
    python dilatequant.py --model ldm-lsun-church --ckpt model.ckpt --bits 4   # LDM-8 LSUN-Church (GPU)
    python dilatequant.py --load runs/dilatequant/dilatequant.safetensors   # sample a saved model again

Expected result of `python dilatequant.py --bits 4` (bundled 1.1 M-parameter CIFAR-10 UNet, DDIM-20, 2-core
CPU, ~465 s; N = 256 samples, FID against the bundled fragment statistics, FP FID 136.8):
    naive PTQ W4A4:    ε-MSE 0.1028, PSNR vs FP 15.05 dB, FID 298.8
    no BKD W4A4:       ε-MSE 0.0435, PSNR vs FP 13.52 dB, FID 227.0
    DilateQuant W4A4:  ε-MSE 0.0362, PSNR vs FP 21.05 dB, FID 162.8
(The paper: DDPM CIFAR-10 W4A4 FID 9.13 with DDIM-100 on the 35.7 M model, 1.08 h on one RTX A6000.)

Where this differs from the paper or the official code:
- weights trained at Adam LR 1e-5, not the paper's 1e-2 (destructive on raw weights): --lr-w
- ε̂ divided by its per-step correlated scale k_t (PTQD, He et al. NeurIPS 2023), not in the paper; on by
  default, without it MSE-distilled W4A4 models sample noise: --no-eps-correct
- the paper's "first and last layers at 8 bit" are the layers that read x_t and write ε (conv_in,
  conv_out), found by data flow, at W8A8. The official code (EDA-DM's qdiff/quant_model.py) takes the first
  and last weight quantizers in registration order (temb.dense.0, conv_out), so x_t is read at 4 bit,
  leaves conv_out's input FP and puts a_list[-2] at 8 bit: --first-last official
- TPQ rows of skewed mixed-sign inputs (smaller side < half the larger, e.g. post-SiLU) start from an
  asymmetric α·[min, max] search; EDA-DM's search is symmetric for any mixed-sign input: --act-range symmetric
- zero points z_x^t train at Adam LR 1e-2 (they count grid steps: at the paper's 1e-4 they move at most
  half a step in 5K iterations): --lr-z 1e-4
- shortcut split (Q-Diffusion, EDA-DM): one TPQ per half of cat([h, skip]) but one weight quantizer over
  both halves (EDA-DM has two), so WD's range guarantee holds: --split
- softmax-probability input of attention at 8 bit, EDA-DM's sm_abit: --sm-bits
- TPQ rows start from EDA-DM's L_p-2.4 range search (qdiff/quant_layer.py, perform_1D_search) on each
  step's activations after WD; the paper does not say (naive PTQ: min-max)
- both LRs cosine-annealed to 0 over each block's iterations, as EDA-DM's qdiff/block_recon.py; the paper
  gives no schedule
- weight ranges min-max per output channel (the only range WD keeps exactly; EDA-DM searches by MSE)
- blocks as Q-Diffusion/BRECQ split them (ResnetBlock, AttnBlock, resampling, lone layers; LDM: ResBlock,
  AttentionBlock, BasicTransformerBlock), 5000 iterations each (the paper gives 5K, not the cut): --iters
- LDM attention: a TPQ row per step and head; a guided batch's two halves share the step's row
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

from common import (QuantConv2d, QuantLinear, Quantizer, UserError, check_bits, fake_quant, fid_or_none,
                    load_saved, load_strict, lp_search_range, minmax_range,
                    net_args, parse_config, parse_list, peak_mb, predict, print_table, psnr,
                    replace_modules, resolve_bits, round_ste, run_main, save_grid, save_panels,
                    save_safetensors, seed_everything, set_quant, write_record)
from models import distributed, first_last_layers, in_order, ldm, load_model, sampling_mode
from models.ddpm import AttnBlock, Downsample, ResnetBlock, Upsample

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration: the paper's settings, and a quick preset for the bundled model

@dataclass
class Config:
    """DilateQuant (arXiv 2409.14307) on a DDPM or LDM UNet: FP vs naive PTQ vs DilateQuant in one run."""
    model: str = "ddpm-cifar10-small"  # bundled (offline), ddpm-cifar10 or an LDM (ldm-lsun-church, ...)
    ckpt: str = ""                 # weights file for --model (default: the model's own checkpoint)
    bits: int = 4                  # W and A bits (paper: W4A4, W6A6)
    w_bits: int = 0                # weight bits, overrides --bits (0: use --bits)
    a_bits: int = 0                # activation bits, overrides --bits (0: use --bits)
    sm_bits: int = 8               # bits of attention's softmax-probability input (EDA-DM's sm_abit: 8)
    first_last: str = "position"   # W8A8 first/last layers: position (conv_in, conv_out), official or none
    act_range: str = "skewed"      # TPQ start: skewed (asymmetric for skewed inputs) or symmetric (official)
    split: bool = True             # shortcut split: two TPQ tables for cat([h, skip]) of up-path shortcuts
    steps: int = 100               # DDIM steps (DDPM: quad sequence; LDM: uniform) = TPQ rows T
    eta: float = 0.0               # DDIM η (EDA-DM's settings: 0; LDM-4 LSUN-Bedroom 1.0)
    cfg_scale: float = 1.0         # classifier-free guidance of a class-conditional LDM (cin256-v2: 3.0)
    calib: int = 5120              # calibration samples (x_t, t, step), random over FP trajectories (paper)
    calib_traj: int = 256          # FP trajectories the calibration samples are drawn from
    iters: int = 5000              # BKD iterations per block (paper: 5K; per block as in EDA-DM)
    batch: int = 32                # BKD batch size (paper: 32)
    cpu_cache: bool = False        # keep BKD's cached block inputs/outputs on the CPU in fp16 (LDM presets)
    lr_q: float = 1e-4             # Adam LR of Δ_w and Δ_x^t (paper: 1e-4 for Δ and z)
    lr_z: float = 1e-2             # Adam LR of the zero points z_x^t, in grid steps (paper: 1e-4)
    lr_w: float = 1e-5             # Adam LR of the weights (paper: 1e-2, destructive on raw weights)
    eps_correct: bool = True       # divide ε̂ by its per-step correlated scale k_t (PTQD; not in the paper)
    ablate: str = "bkd"            # extra variants, comma-separated: wd (no WD), tpq (one row), bkd (no BKD)
    n: int = 50000                 # samples per variant for FID / PSNR / the grid (paper: 50k)
    eval_batch: int = 500          # images per forward without gradients (sampling, caching, scoring)
    ref: str = ""                  # FID reference statistics .npz (eval_fid.py --save-stats); empty: no FID
    seed: int = 0                  # seed of calibration, training and (seed + 1) sampling noise
    amp: str = "none"              # sampling under autocast: none (fp32) or bf16 (convolutions and matmuls)
    compile: bool = False          # torch.compile the network for sampling
    device: str = "auto"           # auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)
    out: str = "runs/dilatequant"  # results.json, grids, saved quantized models
    load: str = ""                 # a saved quantized model (.safetensors from --out): FP vs it, no training


# Defaults follow the model: the paper's settings for its checkpoint, a preset sized for a 2-core CPU
# (<= 10 min for `--bits 4`) for the bundled one. Flags given on the command line win. LDMs: EDA-DM's sampler
# settings (the official README: "the same as EDA-DM"), 5120 points, BKD caches on the CPU in fp16.
LDM = dict(calib=5120, calib_traj=64, iters=5000, n=50000, eval_batch=50, ref="", cpu_cache=True)
PRESETS = {
    "ddpm-cifar10-small": dict(steps=20, calib=512, calib_traj=64, iters=160, n=256, eval_batch=64,
                               ref=os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")),
    "ddpm-cifar10": dict(steps=100, calib=5120, calib_traj=256, iters=5000, n=50000, eval_batch=500, ref=""),
    "ldm-lsun-bedroom": dict(steps=200, eta=1.0, **LDM),
    "ldm-lsun-church": dict(steps=500, **LDM),
    "ldm-cin256-v2": dict(LDM, steps=20, cfg_scale=3.0, calib_traj=256),
}


# -----------------------------------------------------------------------------
# Weight Dilation (Eqs. 10-12)

@torch.no_grad()
def dilation_scales(W):
    """s [C_in] for a weight [C_out, C_in, ...] (Eqs. 10-12). An in-channel k that holds some output
    channel's max or min (the saturated set A) keeps s_k = 1; any other column is stretched until its
    first element touches its output channel's bound: s_k = min(s_k+, s_k-) with
    s_k+ = min_{j,κ: W>0} W_max,j / W[j,k,κ] and s_k- = min_{j,κ: W<0} W_min,j / W[j,k,κ].
    The bounds include 0, as the weight quantizer's range does."""
    O, I = W.shape[:2]
    Wf = W.reshape(O, I, -1).float()                                # [O, I, K]
    wmax = Wf.amax((1, 2), keepdim=True).clamp(min=0)               # [O, 1, 1]
    wmin = Wf.amin((1, 2), keepdim=True).clamp(max=0)
    inf = torch.tensor(float("inf"), device=W.device)
    # zero weights set no bound: masked to +inf, never divided (Eqs. 10-11 as written divide by W)
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
    shape = (1, -1) + (1,) * (W.dim() - 2)                          # s along dim 1
    shape_o = (-1,) + (1,) * (W.dim() - 1)                          # a bound per output channel
    Wf = W.reshape(W.shape[0], -1)
    lo, hi = Wf.amin(1).clamp(max=0), Wf.amax(1).clamp(min=0)       # [O]
    return torch.minimum(torch.maximum(W * s.view(shape), lo.view(shape_o)), hi.view(shape_o))


class Dilated(nn.Module):
    """A quantized conv/linear fed X/s: Q_x(X/s) ⊛ Q_w(W·s). The 1/s cannot be folded through SiLU, so it
    is applied just before the activation quantizer, as the same author's BienLuky/PTQ4ARVG applies its
    equivalent scales (MAR/quant/quant_modules.py). s is a fixed buffer."""

    def __init__(self, layer, s):
        super().__init__()
        self.layer = layer
        dims = layer.weight.dim() - 2                                # 2: Conv2d, 1: Conv1d, 0: Linear (last)
        self.register_buffer("s", s.view((1, -1) + (1,) * dims if isinstance(layer, QuantConv2d) else (-1,)))

    def forward(self, x):
        return self.layer(x * self.s.reciprocal())                   # a product: division is 3x slower on CPU


# -----------------------------------------------------------------------------
# Temporal Parallel Quantizer (Eqs. 13-14)

class TPQ(nn.Module):
    """Activation quantizer with one (Δ_x^t, z_x^t) row per sampling step t and head h (Eq. 13):
    Q(x) = Δ_x^t (clip(round(x/Δ_x^t) + z_x^t, 0, 2^b − 1) − z_x^t). Each sample gathers the row of its
    own step index `t_idx` (Eq. 14), so a mini-batch may mix steps and every row in it gets gradients.
    The index is the position in the sampler's sequence, set by set_step(); with T = 1 every step
    shares row 0 (ablation and naive PTQ). Heads (LDM attention) have their own rows and are folded into
    the batch, b-major ([B·H, ...]), as the matmul inputs they quantize."""

    def __init__(self, bits, T, heads=1):
        super().__init__()
        self.bits, self.on, self.t_idx = bits, False, None
        self.delta = nn.Parameter(torch.ones(T, heads))               # Δ_x [T, H]
        self.zero = nn.Parameter(torch.zeros(T, heads))               # z_x [T, H], rounded in use

    def forward(self, x):
        if not self.on:
            return x
        idx = self.t_idx if len(self.delta) > 1 else torch.zeros_like(self.t_idx)
        idx = idx.expand(x.shape[0] // self.delta.shape[1])           # one index [1]: the whole batch's step
        shape = (-1,) + (1,) * (x.dim() - 1)
        delta, zero = self.delta[idx].reshape(shape), self.zero[idx].reshape(shape)   # [B·H, 1, ...]
        qmax = 2 ** self.bits - 1
        zero = torch.clamp(round_ste(zero), 0, qmax)                  # an integer zero point at inference
        if not torch.is_grad_enabled():                              # sampling: the same steps, in place
            return x.mul(delta.reciprocal()).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(delta)
        return fake_quant(x, delta, zero, 0, qmax)

    @torch.no_grad()
    def set_row(self, t, lo, hi):
        """Row t (all heads) from a range [lo, hi] that includes 0, as EDA-DM's quantizer."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        delta = max((hi - lo) / (2 ** self.bits - 1), 1e-8)
        self.delta[t] = delta
        self.zero[t] = min(max(round(-lo / delta), 0), 2 ** self.bits - 1)

    @torch.no_grad()
    def clamp_(self):
        """After each optimizer step: Δ > 0, z within the integer grid's range."""
        self.delta.clamp_(min=1e-8)
        self.zero.clamp_(0, 2 ** self.bits - 1)


class SplitTPQ(nn.Module):
    """Shortcut split (Q-Diffusion, EDA-DM): an input cat([h, skip]) gets one TPQ per half."""

    def __init__(self, bits, T, split):
        super().__init__()
        self.split, self.h, self.skip = split, TPQ(bits, T), TPQ(bits, T)

    def forward(self, x):
        return torch.cat([self.h(x[:, :self.split]), self.skip(x[:, self.split:])], dim=1)


def set_step(model, t_idx):
    """Tell every TPQ the step index of each sample in the batch, t_idx [B]: the position in the sampler's
    sequence, never derived from t (the quad sequence repeats small t)."""
    model.t_idx = t_idx                                              # for the ε-scale correction below
    for m in model.modules():
        if isinstance(m, TPQ):
            m.t_idx = t_idx


def switch(model, on):
    """Quantization on (weights and activations) or off (the dilated model in full precision). Every
    layer always calls its TPQ, which passes x through when off."""
    set_quant(model, on, True)
    for m in model.modules():
        if isinstance(m, TPQ):
            m.on = on


# -----------------------------------------------------------------------------
# The quantized model: every conv/linear (per-out-channel weights, TPQ inputs) and the attention
# matmul inputs; norms, SiLU, softmax itself, residuals and resampling stay FP.

def special_layers(q, rule, example):
    """(layers with 8-bit weights, with 8-bit inputs, with FP inputs) of the first/last-layer `rule`.
    "position", the papers' "first and last layers at 8 bit": the layer that reads x_t (conv_in) and the
    one that writes ε (conv_out), found by data flow (models.first_last_layers), at W8A8. "official":
    BienLuky/EDA-DM qdiff/quant_model.py (set_first_last_layer_to_8bit, disable_network_output_quantization)
    in registration order: 8-bit weights of the first and last layers (temb.dense.0, conv_out, so x_t is
    read at the low bit width), conv_out's input FP, the second-to-last layer's input (a_list[-2]) at
    8 bit. "none": all at the requested bits. example: the network's inputs for one traced forward."""
    names = [n for n, m in q.named_modules() if isinstance(m, LAYERS)]
    if rule == "official":
        return {names[0], names[-1]}, {names[-2]}, {names[-1]}
    if rule == "none":
        return set(), set(), set()
    ends = set(first_last_layers(q, *example))
    return ends, ends, set()


LAYERS = (nn.Conv2d, nn.Conv1d, nn.Linear)  # quantized: every conv (LDM's AttentionBlock: Conv1d) and linear


def quantize(fp, *, w_bits, a_bits, sm_bits, T, example, wd=True, split=True, first_last="position",
             steps=None):
    """A copy of `fp` with fake quantizers. Per layer: s from the FP weights (when wd), W <- W·s, then
    the weight range, which WD leaves as it was; TPQ ranges come later, from X/s (init_tpq). T: TPQ rows
    (1 or the sampler's steps); steps: the sampler's steps, one ε-scale correction k_t each (default T);
    first_last: which layers stay at 8 bit (special_layers, traced on the inputs `example`)."""
    q = copy.deepcopy(fp)
    splits = {f"{n}.{'nin_shortcut' if isinstance(m, ResnetBlock) else 'skip_connection'}": m.split  # LDM
              for n, m in q.named_modules() if isinstance(m, (ResnetBlock, ldm.ResBlock)) and m.split}
    w8, a8, a_fp = special_layers(q, first_last, example)

    def make(name, layer):
        aq = None                                                    # no input quantizer: FP input
        if name not in a_fp:
            ab = 8 if name in a8 else a_bits
            aq = SplitTPQ(ab, T, splits[name]) if split and name in splits else TPQ(ab, T)
        W = layer.weight.data                                        # [C_out, C_in, ...]
        if wd and aq is not None:                                    # Eqs. 10-12 (a layer fed FP keeps W)
            s = dilation_scales(W)
        else:
            s = torch.ones(W.shape[1], device=W.device)
        layer.weight.data = dilate(W, s)                             # W <- W·s
        wq = Quantizer(8 if name in w8 else w_bits, "channel", include_zero=True)
        wq.set_range(*minmax_range(wq.rows(layer.weight.data)))      # min-max per out channel: Δ_w as pre-WD
        wrap = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        return Dilated(wrap.from_float(layer, wq.make_learnable(), aq), s)

    replace_modules(q, lambda n, m: isinstance(m, LAYERS), make)
    for m in q.modules():                      # QK^T and softmax·V inputs of every attention (DDPM, LDM)
        if hasattr(m, "act_softmax"):
            h = getattr(m, "num_heads", getattr(m, "heads", 1))     # LDM: one row per head
            m.act_q, m.act_k, m.act_v = TPQ(a_bits, T, h), TPQ(a_bits, T, h), TPQ(a_bits, T, h)
            m.act_softmax = TPQ(sm_bits, T, h)
    q.register_buffer("eps_k", torch.ones(steps or T))              # ε̂ / k_t, ones until measured
    return q.to(next(fp.parameters()).device)                        # the new Δ, z tables join fp's device


SKEW = 0.5  # a mixed-sign input whose smaller side is below half its larger side gets an asymmetric range


def row_range(bits, seen, search, skew=SKEW):
    """One TPQ row's range from what it saw, [(min, max, subsample), ...]: min-max, or EDA-DM's L_p-2.4
    search (qdiff/quant_layer.py, perform_1D_search) over the extremes plus the subsamples. EDA-DM searches
    a symmetric [−τ, τ] for any mixed-sign input, which leaves half of the grid unused on post-SiLU
    inputs (min −0.28, max ~5); skew > 0 searches those as α·[min, max] (skew = 0: the official search)."""
    lo, hi = min(s[0] for s in seen).item(), max(s[1] for s in seen).item()
    if not search:
        return lo, hi
    v = torch.cat([seen[0][2].new_tensor([lo, hi])] + [s[2] for s in seen])
    lo, hi = lp_search_range(v[None], bits, [i / 100 for i in range(1, 101)], skew=skew)
    return lo.item(), hi.item()


@torch.no_grad()
def init_tpq(q, calib, T, search=True, batch=256, skew=SKEW):
    """Every TPQ row t from the calibration activations of step t, after WD (the paper does not say how
    rows start): L_p-2.4 search (row_range, skew), or min-max with search=False. With T = 1 one row sees all
    steps. Rows no calibration sample reached take the all-step range. Pre-hooks on the TPQs record, per
    batch, each input's min, max and 4096 random entries (global RNG, in call order), removed at the end."""
    tpqs = [m for m in q.modules() if isinstance(m, TPQ)]
    seen = {m: [] for m in tpqs}

    def record(m, args):
        v = args[0].detach().flatten()
        seen[m].append((v.min(), v.max(), v[torch.randint(len(v), (min(len(v), 4096),))]))

    hooks = [m.register_forward_pre_hook(record) for m in tpqs]
    switch(q, False)
    n = len(calib["x"])
    groups = [torch.arange(n)] if T == 1 else [torch.nonzero(calib["idx"] == t)[:, 0] for t in range(T)]
    if any(len(sel) == 0 for sel in groups):
        groups.append(torch.arange(n))                               # the all-step fallback, last
    ranges = []
    for sel in tqdm(groups, desc="init TPQ", leave=False):
        if len(sel) == 0:
            ranges.append(None)
            continue
        for m in tpqs:
            seen[m] = []
        for b in sel.split(batch):
            q(*net_args(calib, b))
        ranges.append([row_range(m.bits, seen[m], search, skew) for m in tpqs])
    for h in hooks:
        h.remove()
    for t in range(T):
        for m, (lo, hi) in zip(tpqs, ranges[t] or ranges[-1]):
            m.set_row(t, lo, hi)


# -----------------------------------------------------------------------------
# Calibration data: FP sampling trajectories, samples drawn at random across steps (data-free)

@torch.no_grad()
def calibration_set(d, fp, seq, *, n, trajectories, batch, eta, cfg_scale, generator, seed):
    """`n` random (x_t, t, step index[, class]) from `trajectories` FP DDIM trajectories of the model `d`
    (random classes; under guidance also the unconditional inputs), as the official README's random sampling
    (EDA-DM chooses how many per step instead). Trajectories are shared out under torchrun (η > 0: noise
    of trajectory i from (seed, i)); the points are gathered per batch of trajectories, step by step."""
    noise = torch.randn(trajectories, *d.shape, generator=generator).to(next(fp.parameters()).device)
    labels, S, parts = d.labels(trajectories, generator), len(seq), []
    xs = d.trajectories(fp, noise, seq, labels=labels, eta=eta, cfg_scale=cfg_scale, batch=batch, seed=seed)
    for c in torch.arange(trajectories).split(batch):
        i = torch.arange(S - 1, -1, -1).repeat_interleave(len(c))    # the step's index in seq, noisiest first
        part = dict(x=xs[c].transpose(0, 1).flatten(0, 1), t=torch.as_tensor(seq).float()[i], idx=i)
        part |= {} if labels is None else dict(y=labels[c].repeat(S))
        parts.append(d.with_uncond({k: v.to(noise.device) for k, v in part.items()}, cfg_scale))
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    pick = torch.randperm(len(data["x"]), generator=generator)[:n]
    return {k: v[pick] for k, v in data.items()}


# -----------------------------------------------------------------------------
# Block-wise Knowledge Distillation (Eq. 15)

class _Stop(Exception):
    pass


# The blocks of the Q-Diffusion/BRECQ split. DDPM: ResnetBlock, AttnBlock, Down/Upsample; LDM: ResBlock (also
# with up/down), AttentionBlock, SpatialTransformer's BasicTransformerBlock (its proj_in/out: lone layers)
BLOCKS = (ResnetBlock, AttnBlock, Downsample, Upsample, ldm.ResBlock, ldm.AttentionBlock, ldm.Downsample,
          ldm.BasicTransformerBlock)


def blocks_in_order(model, example):
    """The distillation units in execution order, traced on the inputs `example`: each block of BLOCKS and
    each quantized layer outside them (DDPM: conv_in, temb.dense, conv_out; LDM: time_embed, out.2, ...)."""
    set_step(model, torch.zeros(1, dtype=torch.long, device=example[0].device))
    return in_order(model, example, BLOCKS, Dilated)


@torch.no_grad()
def block_io(model, block, calib, batch, want_output, cpu_cache=False):
    """The inputs of `block` over the calibration set, or with want_output its output alone (the inputs are
    not kept); the forward stops at the block. With cpu_cache they are kept on the CPU in fp16 (an LDM's
    5120 inputs of one block: up to 28 GB, Bedroom)."""
    ins, outs = [], []
    keep = (lambda a: a.detach().to("cpu", torch.float16)) if cpu_cache else (lambda a: a.detach())

    def hook(m, args, out):
        if want_output:
            outs.append(keep(out))
        else:
            ins.append([keep(a) for a in args])
        raise _Stop

    h = block.register_forward_hook(hook)
    for b in torch.arange(len(calib["x"])).split(batch):
        set_step(model, calib["idx"][b])
        try:
            model(*net_args(calib, b))
        except _Stop:
            pass
    h.remove()
    return [torch.cat(a) for a in zip(*ins)], (torch.cat(outs) if want_output else None)


def distill_block(block, q_in, target, t_idx, *, iters, batch, lr_w, lr_q, lr_z, generator):
    """Eq. 15 for one block: Adam on its weights w (lr_w), its Δ_w, Δ_x^t (lr_q) and z_x^t (lr_z), the LRs
    annealed to 0 by a cosine (as EDA-DM's block_reconstruction). Each mini-batch of cached inputs brings
    its own step indices, so the TPQ rows of all steps in it train together. z is counted in grid steps
    and Adam moves a parameter by about its LR per step: at the paper's 1e-4 for both, z moves at most
    0.5 of a grid step in 5000 iterations and its rounded value never changes; lr_z = 1e-2 lets it move
    a grid step in ~100. Returns the first and last mini-batch losses."""
    layers = [m.layer for m in block.modules() if isinstance(m, Dilated)]
    weights = [m.weight.requires_grad_(True) for m in layers]
    tpqs = [m for m in block.modules() if isinstance(m, TPQ)]
    deltas = [m.wq.delta for m in layers] + [m.delta for m in tpqs]
    zeros = [m.zero for m in tpqs]
    opt = torch.optim.Adam([dict(params=weights, lr=lr_w), dict(params=deltas, lr=lr_q),
                            dict(params=zeros, lr=lr_z)])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    losses, device = [], t_idx.device                                # kept on the device: no sync a step
    for _ in range(iters):
        b = torch.randint(len(target), (batch,), generator=generator)
        set_step(block, t_idx[b.to(device)])
        fetch = lambda a: a[b.to(a.device)].to(device, torch.float32)  # noqa: E731  (from a CPU cache too)
        loss = F.mse_loss(block(*map(fetch, q_in)), fetch(target))     # MSE(B̂_k(q_in), B_k(fp_in))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for m in block.modules():                                    # keep Δ > 0 and z on the grid's range
            if isinstance(m, TPQ):
                m.clamp_()
            elif isinstance(m, Quantizer):
                m.delta.data.clamp_(min=1e-8)
        losses.append(loss.detach())
    for p in weights + deltas + zeros:
        p.requires_grad_(False)                                      # frozen from here on
    return (losses[0].item(), losses[-1].item()) if losses else (None, None)


def bkd(fp, q, calib, cfg, example, generator):
    """Block k = 1..K in execution order: the target is the FP network's block-k output, the input the
    quantized network's own block-k input (the already distilled prefix: Eq. 15's B̂_k∘…∘B̂_1)."""
    fp_mods, q_mods = dict(fp.named_modules()), dict(q.named_modules())
    switch(q, True)
    log = []
    for name in tqdm(blocks_in_order(q, example), desc="BKD"):
        _, target = block_io(fp, fp_mods[name], calib, cfg.eval_batch, True, cfg.cpu_cache)  # FP output
        q_in, _ = block_io(q, q_mods[name], calib, cfg.eval_batch, False, cfg.cpu_cache)     # quantized input
        first, last = distill_block(q_mods[name], q_in, target, calib["idx"], iters=cfg.iters,
                                    batch=cfg.batch, lr_w=cfg.lr_w, lr_q=cfg.lr_q, lr_z=cfg.lr_z,
                                    generator=generator)
        log.append(dict(block=name, loss_first=first, loss_last=last))
    return log


# -----------------------------------------------------------------------------
# The ε-scale correction (not in the paper): PTQD's correlated part of the error (He et al., NeurIPS 2023)
#
# A quantized denoiser's error splits into a part along ε_FP and a residual: ε̂ = k_t ε_FP + r. MSE
# training shrinks the prediction (k_t < 1: regressing through noisy, quantized inputs attenuates),
# and DDIM amplifies a scale error where the noise is high: x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t
# with √ᾱ_t ≈ 0.04 at the first steps, so 8 % too little ε leaves 2x the signal's size of noise
# in x̂_0 and the trajectory diverges. Measured on the bundled model at W4A4 after BKD: k_t = 0.92 at
# every high-noise step; samples with std 2.1 (FP 0.44) and PSNR 10.6 dB; divided by k_t, 0.96 and
# 17.3 dB (naive PTQ: 13.3 dB). The same k_t is measured for every quantized variant, naive PTQ
# included, so the comparison stays fair.

@torch.no_grad()
def correlated_scale(q, calib, eps_fp, T, batch=256):
    """k_t = <ε̂, ε_FP> / <ε_FP, ε_FP> over the calibration samples of step t, one per sampler step even
    when the quantizer has one TPQ row (the shrinkage is largest at the low-noise steps, and one pooled k
    would over-correct the high-noise steps that matter most)."""
    num, den = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for b in torch.arange(len(calib["x"])).split(batch):
        set_step(q, calib["idx"][b])
        e_q, e = q(*net_args(calib, b)).flatten(1), eps_fp[b].flatten(1)
        row = calib["idx"][b].cpu()
        num.index_add_(0, row, (e_q * e).sum(1).double().cpu())
        den.index_add_(0, row, (e * e).sum(1).double().cpu())
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.ones_like(den)).float()


def denoiser(q):
    """ε̂(x_t, t[, y]) / k_t at the step index given to set_step (k_t = 1: uncorrected)."""
    def eps(*args):
        return q(*args) / q.eps_k[q.t_idx].view(-1, 1, 1, 1)
    return eps


# -----------------------------------------------------------------------------
# Evaluation: samples from the same noise, ε-MSE vs FP, PSNR vs FP samples, FID when possible

def eps_of(net, quantized):
    """The network's own ε̂ (no k_t correction) on a data chunk dict(x, t, idx), for common.predict: a
    quantized model quantizes each sample with its own step's TPQ row."""
    def eps(d):
        if quantized:
            set_step(net, d["idx"])
        return net(*net_args(d))
    return eps


def sample(d, net, noise, seq, *, labels, quantized, cfg):
    """Images decoded from DDIM samples of the model `d` from `noise` (labels: their classes, or None); a
    quantized model runs step i on TPQ row i (both halves of a guided batch), ε̂/k_i."""
    def step(k):
        set_step(net, torch.full((1,), k, device=noise.device))
    with sampling_mode(net, amp=cfg.amp, compile=cfg.compile):      # weights quantized once
        return d.images(denoiser(net) if quantized else net, noise, seq, labels=labels, eta=cfg.eta,
                        cfg_scale=cfg.cfg_scale, batch=cfg.eval_batch, seed=cfg.seed + 1,
                        before_step=step if quantized else None)


def scores(q, x, *, fp_x, held, eps_ref, cfg):
    """A quantized model's metrics: the network's own ε-MSE and that of ε̂/k_t on the held-out points
    (ε̂ predicted once for both), PSNR of its samples x against FP's, FID when a reference is given."""
    e = predict(eps_of(q, quantized=True), held, cfg.eval_batch)
    k = q.eps_k[held["idx"]].view(-1, 1, 1, 1)
    return dict(eps_mse=F.mse_loss(e, eps_ref).item(), eps_mse_corrected=F.mse_loss(e / k, eps_ref).item(),
                psnr=psnr(x, fp_x), fid=fid_or_none(x, cfg.ref, e.device))


# -----------------------------------------------------------------------------
# The comparison: variants, training one, loading one, main

VARIANTS = {  # wd: Weight Dilation; tpq: a row per step (else one); bkd: distil; search: L_p row init
    "ptq": dict(wd=False, tpq=False, bkd=False, search=False),     # naive PTQ: one min-max row, no training
    "dilatequant": dict(wd=True, tpq=True, bkd=True, search=True),
    "no_wd": dict(wd=False, tpq=True, bkd=True, search=True),      # Table 3's ablations (--ablate)
    "no_tpq": dict(wd=True, tpq=False, bkd=True, search=True),
    "no_bkd": dict(wd=True, tpq=True, bkd=False, search=True),
}
ABLATIONS = {"wd": "no_wd", "tpq": "no_tpq", "bkd": "no_bkd"}        # --ablate name -> variant


def check_config(cfg):
    """(weight bits, activation bits, [variant names]) from the flags, or a UserError naming the flag."""
    w_bits, a_bits = resolve_bits(cfg.bits, cfg.w_bits, cfg.a_bits)
    check_bits(sm_bits=cfg.sm_bits)
    ablate = parse_list(cfg.ablate, ABLATIONS, "--ablate")
    if cfg.first_last not in ("position", "official", "none") or cfg.act_range not in ("skewed", "symmetric"):
        raise UserError(f"--first-last {cfg.first_last!r} / --act-range {cfg.act_range!r}: choose position, "
                        "official or none / skewed or symmetric")
    if not 2 <= cfg.steps <= 1000 or cfg.eta < 0 or cfg.amp not in ("none", "bf16"):
        raise UserError(f"--steps {cfg.steps} / --eta {cfg.eta} / --amp {cfg.amp}: DDIM needs 2..1000 steps "
                        "and η >= 0; --amp is none or bf16")
    if not cfg.batch <= cfg.calib <= cfg.calib_traj * cfg.steps:
        raise UserError(f"--calib {cfg.calib} must lie in [--batch {cfg.batch}, --calib-traj x --steps = "
                        f"{cfg.calib_traj * cfg.steps}] (the FP trajectories hold that many points)")
    return w_bits, a_bits, ["ptq", "dilatequant"] + [ABLATIONS[a] for a in ablate]


def train_variant(fp, v, *, cfg, w_bits, a_bits, calib, calib_eps, example, generator):
    """One quantized model of the comparison from the VARIANTS entry v: quantize (with or without WD),
    initialise the TPQ rows, distil block by block (when v["bkd"]), then measure k_t. Returns (q, BKD log)."""
    T = cfg.steps if v["tpq"] else 1
    q = quantize(fp, w_bits=w_bits, a_bits=a_bits, sm_bits=cfg.sm_bits, T=T, example=example, wd=v["wd"],
                 split=cfg.split, first_last=cfg.first_last, steps=cfg.steps)
    skew = SKEW if cfg.act_range == "skewed" else 0.0
    init_tpq(q, calib, T, search=v["search"], batch=cfg.eval_batch, skew=skew)
    log = bkd(fp, q, calib, cfg, example, generator) if v["bkd"] else None
    switch(q, True)
    if cfg.eps_correct:
        q.eps_k.copy_(correlated_scale(q, calib, calib_eps, len(q.eps_k), cfg.eval_batch))
    return q, log


def load_variant(fp, state, saved, cfg, example):  # a model save_variant wrote, its settings in cfg
    T = cfg.steps if saved["tpq"] else 1
    q = quantize(fp, w_bits=saved["w_bits"], a_bits=saved["a_bits"], sm_bits=cfg.sm_bits, T=T,
                 example=example, wd=saved["wd"], split=cfg.split, first_last=cfg.first_last, steps=cfg.steps)
    device = next(fp.parameters()).device
    return load_strict(q, {k: v.to(device) for k, v in state.items()}, cfg.load)


def save_variant(q, name, cfg, w_bits, a_bits):
    """<out>/<name>.safetensors: the state (weights, s, Δ_w, TPQ tables, k_t) and, in its metadata, the
    run's settings (model, sampler, bits, first/last rule, N, seed...) and the variant's, for --load."""
    drop = ("device", "out", "load", "ablate")
    keep = {k: v for k, v in asdict(cfg).items() if k not in drop}
    meta = dict(keep, w_bits=w_bits, a_bits=a_bits, wd=VARIANTS[name]["wd"], tpq=VARIANTS[name]["tpq"])
    save_safetensors(q.state_dict(), os.path.join(cfg.out, f"{name}.safetensors"),
                     metadata=dict(dilatequant=json.dumps(meta)))


def main():
    cfg = parse_config(Config, PRESETS)
    state, saved = None, None
    if cfg.load:                     # the file's model, its preset and its settings; flags given still win
        state, saved = load_saved(cfg.load, "dilatequant")
        if "first_last" not in saved:
            raise UserError(f"{cfg.load}: saved without its first/last-layer setting; quantize it again")
        cfg = parse_config(Config, PRESETS, saved=saved)
        for k in ("bits", "w_bits", "a_bits", "sm_bits", "split", "first_last"):   # shape the quantizers
            if getattr(cfg, k) != saved[k]:
                raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: {cfg.load} was quantized with "
                                f"{saved[k]}; drop the flag")
    w_bits, a_bits, names = check_config(cfg)
    names = ["loaded"] if saved else names
    seed_everything(cfg.seed)
    device, t_start = distributed(cfg.device)[2], time.time()      # torchrun: sampling shared out
    os.makedirs(cfg.out, exist_ok=True)
    d = load_model(cfg.model, cfg.ckpt or None, cfg_scale=cfg.cfg_scale)
    fp = d.net.to(device).requires_grad_(False)
    d.decode.to(device)
    seq, example = d.timesteps(cfg.steps), d.example(device)
    g = torch.Generator().manual_seed(cfg.seed)                         # held-out points, calibration, BKD
    noise = torch.randn(cfg.n, *d.shape, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    labels = d.labels(cfg.n)
    print(f"{cfg.model}, W{w_bits}A{a_bits} (softmax {cfg.sm_bits}), DDIM-{cfg.steps} η {cfg.eta}, "
          f"{cfg.calib} calibration samples, {cfg.iters} BKD iterations/block, N = {cfg.n}, {device}")

    # FP: reference samples, and held-out ε-MSE points from its own trajectories (not the calibration ones)
    t0 = time.time()
    fp_x = sample(d, fp, noise, seq, labels=labels, quantized=False, cfg=cfg)
    held = d.points(fp, noise[:64], seq, g, labels=None if labels is None else labels[:64], eta=cfg.eta,
                    cfg_scale=cfg.cfg_scale)                            # 512 points
    eps_ref = predict(eps_of(fp, quantized=False), held, cfg.eval_batch)
    results = {"fp": dict(eps_mse=0.0, psnr=None, fid=fid_or_none(fp_x, cfg.ref, device),
                          seconds=time.time() - t0, peak_mb=peak_mb(device))}
    save_grid(fp_x[:64], os.path.join(cfg.out, "grid_fp.png"))
    if not saved:
        calib = calibration_set(d, fp, seq, n=cfg.calib, trajectories=cfg.calib_traj, batch=cfg.eval_batch,
                                eta=cfg.eta, cfg_scale=cfg.cfg_scale, generator=g, seed=cfg.seed)
        calib_eps = predict(eps_of(fp, quantized=False), calib, cfg.eval_batch)   # ε_FP, for k_t

    samples = {}
    for name in names:
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if saved:
            q, log = load_variant(fp, state, saved, cfg, example), None
        else:
            q, log = train_variant(fp, VARIANTS[name], cfg=cfg, w_bits=w_bits, a_bits=a_bits, calib=calib,
                                   calib_eps=calib_eps, example=example, generator=g)
        switch(q, True)
        x = sample(d, q, noise, seq, labels=labels, quantized=True, cfg=cfg)
        results[name] = scores(q, x, fp_x=fp_x, held=held, eps_ref=eps_ref, cfg=cfg) | dict(
            seconds=time.time() - t0, peak_mb=peak_mb(device), eps_k=q.eps_k.tolist(), bkd=log)
        samples[name] = x[:32]
        save_grid(x[:64], os.path.join(cfg.out, f"grid_{name}.png"))
        if not saved:
            save_variant(q, name, cfg, w_bits, a_bits)
        print(f"{name}: {results[name]['seconds']:.0f} s")

    print_table(results)
    if not saved:
        panels = {"FP": fp_x[:32], f"naive PTQ W{w_bits}A{a_bits}": samples["ptq"],
                  f"DilateQuant W{w_bits}A{a_bits}": samples["dilatequant"]}
        save_panels(panels, os.path.join(cfg.out, "compare.png"))
    write_record(os.path.join(cfg.out, "results.json"), asdict(cfg) | dict(w_bits=w_bits, a_bits=a_bits,
                 sampler=d.sampler), results, time.time() - t_start, device)


if __name__ == "__main__":
    run_main(main)
