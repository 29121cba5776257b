"""
EDA-DM: Enhanced Distribution Alignment for post-training quantization of diffusion models (Liu, Li, Xiao,
Chen, Li & Gu, arXiv 2401.04585; official code github.com/BienLuky/EDA-DM, built on Q-Diffusion and BRECQ).
A BRECQ/Q-Diffusion PTQ pipeline for a DDPM or LDM UNet with the paper's two changes (paper Sec. III):

  TDAC, Temporal Distribution Alignment Calibration: how many calibration samples each sampler step gets,
      from a density score D (how many other steps have similar middle-block features) and a variety
      score V (how unlike all other steps a step is): n_k ∝ D̃_k + λ·Ṽ_k.
  FBR, Fine-grained Block Reconstruction: block by block, AdaRound rounding variables and learned
      activation steps (QDrop on), trained on L = d(block output) + γ·Σ_l d(output of layer l inside).

One run compares, on the same sampling noise: FP, naive min-max PTQ (the floor), a Q-Diffusion/BRECQ-style
baseline (uniform calibration, block-output loss), EDA-DM, and the ablations asked for (--ablate tdac,fbr).
It prints a table and writes results.json, grids, compare.png and the quantized models (see --load).

    python edadm.py --w-bits 4 --a-bits 8                    # bundled model, quick preset (2-core CPU)
    python edadm.py --model ddpm-cifar10 --w-bits 4 --a-bits 8 --ref cifar10_train_stats.npz   # the paper's
    python edadm.py --model ldm-lsun-church --ckpt model.ckpt --w-bits 4 --a-bits 8   # LDM-8 Church (GPU)
    python edadm.py --load runs/edadm/edadm.safetensors      # sample a saved model again

Expected result of `python edadm.py --w-bits 4 --a-bits 8` (bundled model, 2-core CPU, ~5-6 min; FID of
N = 192 samples against the bundled CIFAR-10 statistics, FP's own FID 163.53), ε-MSE / PSNR vs FP / FID:
    naive PTQ 0.04149 / 19.67 dB / 212.05;  BRECQ-style 0.02681 / 22.18 dB / 171.14;
    EDA-DM 0.02871 / 22.85 dB / 175.95: ahead on PSNR, behind the BRECQ-style baseline on ε-MSE and FID.

Where this differs from the paper or the official code:
- Bundled-model preset: DDIM-10, N = 96 from B = 48 trajectories, 30 iterations/unit, 192 samples (paper:
  DDIM-100, N = B = 1024, 5000 iterations, 50k): --steps, --calib, --calib-traj, --iters, --n (PRESETS).
- r is scale dependent: 0.2 on the bundled model, where the official 3.0 makes nearly every pair of steps
  "dense"; 3.0 on ddpm-cifar10 (official scripts/calibration.py, TDAC_cifar_calib_data_generator): --radius.
- Counts n_k by largest remainder, not the official round-then-repair (at most 1 apart per step); a constant
  D or V normalises to 0 where the official min-max divides by zero.
- LDM: N = 1024 from B = 64 trajectories reused (one step each per pass) and scored; the official LDM scripts
  sample 16 × 64 fresh trajectories and score the first 64. Cached unit data on the CPU in fp16: --cpu-cache.
- The papers' "first and last layers at 8 bit" by position in the network: conv_in and conv_out, 8-bit
  weights and inputs (models.first_last_layers). The official code (qdiff/quant_model.py,
  set_first_last_layer_to_8bit, disable_network_output_quantization) picks by registration order: 8-bit
  temb.dense.0 and conv_out weights, conv_out's input FP, an 8-bit input on a_list[-2], the second-to-last
  layer registered: --first-last official (none: every layer at the requested bits).
- Shortcut split and no AdaRound regulariser, as every official script: --split, --round-reg.
- lr_w / lr_a by model and weight bits as the official scripts (LRS): --lr-w, --lr-a.
- FBR's layer outputs ô_l come from the same quantized forward as ŷ (one QDrop draw); the official code runs
  the block again for them (qdiff/block_recon.py, block_reconstruction).
- Activation L_p search per calibration batch on the extremes and a 16k random subsample, not the whole tensor
  (CPU time); every calibration sample is used, the official code drops a last partial batch of 256.
- Metrics: ε-MSE (512 held-out points) and PSNR against FP, FID of --n samples; the official evaluation is
  IS and FID of 50k samples against CIFAR-10 train (torch-fidelity, scripts/test.py): --n, --ref.
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

from common import (QuantConv2d, QuantLinear, UserError, check_bits, eps_mse, fake_quant, fid_or_none,
                    load_saved, load_strict, lp_search_range, minmax_range,
                    net_args, parse_config, parse_list, peak_mb, predict, print_table, psnr,
                    quant_params, replace_modules, resolve_bits, run_main, save_grid, save_panels,
                    save_safetensors, seed_everything, set_quant, write_record)
from models import distributed, first_last_layers, in_order, ldm, load_model, sampling_mode
from models.ddpm import AttnBlock, ResnetBlock

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration: the official CIFAR-10 settings (scripts/for_cifar.sh), a quick preset for the bundled model

@dataclass
class Config:
    """EDA-DM (arXiv 2401.04585) on a DDPM or LDM UNet: FP, naive PTQ, BRECQ-style, EDA-DM in one run."""
    model: str = "ddpm-cifar10-small"  # bundled (offline), ddpm-cifar10 or an LDM (ldm-lsun-church, ...)
    ckpt: str = ""                 # weights file for --model (default: the model's own checkpoint)
    bits: int = 8                  # W and A bits (the official scripts run W8A8 and W4A8)
    w_bits: int = 0                # weight bits, overrides --bits (0: use --bits)
    a_bits: int = 0                # activation bits, overrides --bits (0: use --bits)
    sm_bits: int = 8               # bits of the softmax-probability input of attention (official: 8)
    first_last: str = "position"   # 8-bit layers: position (conv_in, conv_out: W8A8), official, none
    split: bool = True             # shortcut split: own quantizers for both halves of cat([h, skip])
    steps: int = 100               # DDIM steps, DDPM: quad sequence (official CIFAR-10: 100); LDM: uniform
    eta: float = 0.0               # DDIM η (official: 0; LDM-4 LSUN-Bedroom 1.0)
    cfg_scale: float = 1.0         # classifier-free guidance of a class-conditional LDM (cin256-v2: 3.0)
    calib: int = 1024              # N, calibration samples (official CIFAR-10: 1024)
    calib_traj: int = 1024         # B, FP trajectories behind them (official: 1024; N > B reuses them)
    lam: float = 1.2               # λ, weight of the variety score against density (official --lamda)
    radius: float = 3.0            # r, density radius on the mean squared feature distance (official: 3.0)
    gamma: float = 0.8             # γ, weight of the layer losses in FBR (official --add_loss: 0.8)
    iters: int = 5000              # reconstruction iterations per unit (official: 5000)
    batch: int = 32                # reconstruction batch (official: 32)
    cpu_cache: bool = False        # keep the units' cached inputs/outputs on the CPU in fp16 (LDM presets)
    lr_w: float = 0.0              # Adam LR of the rounding variables (0: official, 5e-2 at W8, 5e-1 below)
    lr_a: float = 0.0              # Adam LR of the activation steps (0: official, 1e-3 at W8, 5e-4 below)
    qdrop: float = 0.5             # QDrop: probability that an element is quantized while its unit trains
    round_reg: float = 0.0         # AdaRound regulariser weight, β 20 -> 2 after 20 % warm-up (official: 0)
    ablate: str = ""               # extra variants: tdac (uniform calibration), fbr (block loss only), both
    n: int = 50000                 # samples per variant for FID / PSNR / the grid (paper: 50k)
    eval_batch: int = 500          # images per forward without gradients: sampling, caching (official: 500)
    ref: str = ""                  # FID reference statistics .npz (eval_fid.py --save-stats); empty: no FID
    seed: int = 1234               # seed of trajectories, selection, reconstruction; seed + 1: sampling noise
    amp: str = "none"              # sampling under autocast: none (fp32) or bf16 (convolutions and matmuls)
    compile: bool = False          # torch.compile the network for sampling
    device: str = "auto"           # auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)
    out: str = "runs/edadm"        # results.json, grids, saved quantized models
    load: str = ""                 # a saved quantized model (.safetensors from --out): FP vs it, no PTQ


# Defaults follow the model: the official settings for the paper's checkpoint and the LDMs (scripts/for_*.sh:
# sampler, N = 1024, r, λ, γ, iterations, lr_w / lr_a in LRS); for the bundled one a 2-core CPU preset (<= 10
# min at W4A8): r = 0.2 gives D = 0 at both ends and a peak mid-trajectory, the official figure's shape
# (assets/struction.png; r = 3: D = 8-9 everywhere). γ stays 0.8 (layer terms raise ε-MSE at every γ tried).
LDM = dict(calib=1024, calib_traj=64, n=50000, eval_batch=50, ref="", cpu_cache=True)
PRESETS = {
    "ddpm-cifar10-small": dict(steps=10, calib=96, calib_traj=48, iters=30, n=192, eval_batch=64, radius=0.2,
                               ref=os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")),
    "ddpm-cifar10": dict(steps=100, calib=1024, calib_traj=1024, iters=5000, n=50000, eval_batch=500, ref=""),
    "ldm-lsun-bedroom": dict(steps=200, eta=1.0, radius=0.3, lam=1.0, gamma=1.0, iters=5000, **LDM),
    "ldm-lsun-church": dict(steps=500, radius=0.3, lam=1.0, gamma=1.0, iters=5000, **LDM),
    "ldm-cin256-v2": dict(steps=20, cfg_scale=3.0, radius=3.0, lam=1.2, gamma=0.8, iters=1000, **LDM),
}
LRS = {"ddpm": ((5e-2, 1e-3), (5e-1, 5e-4)), "ldm-lsun-bedroom": ((5e-4, 1e-4), (1e-2, 5e-3)),
       "ldm-lsun-church": ((5e-2, 1e-4), (5e-2, 1e-4)), "ldm-cin256-v2": ((1e-4, 1e-3), (5e-1, 1e-4))}
FIRST_LAST = ("position", "official", "none")   # --first-last choices (quantize)
GRID = [i / 100 for i in range(1, 101)]  # the L_p search's 100 clipping ratios (official perform_1D_search)
ZETA = 1.1                               # rectified sigmoid's stretch (AdaRound, official AdaRoundQuantizer)
GAMMA_R = -0.1


# -----------------------------------------------------------------------------
# Quantizers: per-output-channel weights with learned rounding, per-tensor activations with a learned step
# (official qdiff/quant_layer.py, UniformAffineQuantizer; qdiff/adaptive_rounding.py, AdaRoundQuantizer)

class AdaRound(nn.Module):
    """Weight quantizer, one fixed (Δ_w, z_w) per output channel: the L_p-2.4 search over 100 symmetric
    thresholds (official UniformAffineQuantizer.perform_1D_search), or min-max for naive PTQ. With split > 0
    the input channels [:split] and [split:] have their own (Δ_w, z_w) per output channel (official
    QuantModule.set_split). Rounding: nearest while V is None; with rounding variables V,
    ŵ = Δ_w·(clamp(⌊w/Δ_w⌋ + h(V) + z_w, 0, 2^b − 1) − z_w),
    h soft while the unit trains and 1[V ≥ 0] after."""

    def __init__(self, w, bits, search, split=0):
        super().__init__()
        self.bits = bits
        self.soft = False
        self.V = None
        O = w.shape[0]
        deltas, zeros = [], []
        for part in ([w] if not split else [w[:, :split], w[:, split:]]):
            rows = part.reshape(O, -1)                                # [O, I·K]
            lo, hi = lp_search_range(rows, bits, GRID) if search else minmax_range(rows)
            delta, zero = quant_params(lo, hi, bits)                  # [O, 1]
            deltas.append(delta.expand(O, part.shape[1] if split else 1))
            zeros.append(zero.expand_as(deltas[-1]))
        shape = (O, -1) + (1,) * (w.dim() - 2)                       # [O, 1 or I, 1, 1]
        self.register_buffer("delta", torch.cat(deltas, 1).reshape(shape).contiguous())
        self.register_buffer("zero", torch.cat(zeros, 1).reshape(shape).contiguous())

    def h(self):  # rectified sigmoid h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA_R) + GAMMA_R, 0, 1)

    @torch.no_grad()
    def init_rounding(self, w):
        """V with h(V) = ρ = w/Δ_w − ⌊w/Δ_w⌋, so the soft weight starts at the FP weight (official
        AdaRoundQuantizer.init_alpha)."""
        rho = w / self.delta - torch.floor(w / self.delta)             # [O, I, k, k] in [0, 1)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA_R) / (rho - GAMMA_R) - 1))

    def forward(self, w):
        qmax = 2 ** self.bits - 1
        if self.V is None:
            return fake_quant(w, self.delta, self.zero, 0, qmax)
        up = self.h() if self.soft else (self.V >= 0).to(w.dtype)     # hard: 0 or 1 after reconstruction
        return (torch.clamp(torch.floor(w / self.delta) + up + self.zero, 0, qmax) - self.zero) * self.delta


class ActQuant(nn.Module):
    """Per-tensor activation quantizer with a learnable step Δ_a and a fixed zero point z_a; init_acts sets
    both. `keep` < 1 is QDrop (official UniformAffineQuantizer.forward, prob 0.5 while training): each element
    is quantized with probability `keep`, passed in FP otherwise."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.on = False
        self.keep = 1.0
        self.delta = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0.0))

    @torch.no_grad()
    def set_range(self, lo, hi):
        delta, zero = quant_params(lo, hi, self.bits)
        self.delta.copy_(delta)
        self.zero.copy_(zero)

    def forward(self, x):
        if not self.on:
            return x
        qmax = 2 ** self.bits - 1
        if not torch.is_grad_enabled():                   # sampling: the same arithmetic, in place
            return x.div(self.delta).round_().add_(self.zero).clamp_(0, qmax).sub_(self.zero).mul_(self.delta)
        xq = fake_quant(x, self.delta, self.zero, 0, qmax)            # LSQ gradient to Δ_a
        return xq if self.keep >= 1 else torch.where(torch.rand_like(x) < self.keep, xq, x)


def switch(model, on):
    """All quantizers on (fake-quantized weights and activations) or off (the FP network)."""
    set_quant(model, on, on)
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.on = on


LAYERS = (nn.Conv2d, nn.Conv1d, nn.Linear)  # quantized: every conv (LDM's AttentionBlock: Conv1d) and linear


def shortcut(name, block):  # the 1×1 conv that reads a split block's cat([h, skip]): DDPM / LDM naming
    return f"{name}.{'nin_shortcut' if isinstance(block, ResnetBlock) else 'skip_connection'}"


def quantize(fp, w_bits, a_bits, sm_bits, *, search, example, split=True, first_last="position"):
    """A copy of `fp` where every conv/linear quantizes its weight per output channel and its input per
    tensor, and the attention matmul inputs q, k, v, softmax(qkᵀ) are quantized at the hook points (official
    qdiff/quant_block.py, QuantAttnBlock). Split up-path shortcuts: the two halves are quantized at the
    block's shortcut_h/shortcut_skip hooks (so nin_shortcut itself gets no input quantizer) and its weight
    halves get their own ranges. Weight ranges are set here from the weights alone (official
    set_weight_quantize_params gets the same). The layers kept at 8 bit, by first_last:
      "position": the first layer by data flow and the last (models.first_last_layers, `fp` traced on the
          inputs `example`: conv_in and conv_out), 8-bit weights and 8-bit inputs;
      "official" (qdiff/quant_model.py, QuantModel.set_first_last_layer_to_8bit and
          disable_network_output_quantization): the first and last weight quantizers in registration order
          at 8 bit (temb.dense.0 and conv_out), conv_out's input FP, and an 8-bit input on a_list[-2], the
          second-to-last Conv/Linear registered (up.2.upsample.conv on the bundled UNet, up.3.upsample.conv
          on the paper's; a split nin_shortcut would get it at its shortcut_h/shortcut_skip hooks);
      "none": every layer at w_bits / a_bits."""
    if first_last not in FIRST_LAST:
        raise UserError(f"--first-last {first_last!r}: choose from {', '.join(FIRST_LAST)}")
    q = copy.deepcopy(fp)
    names = [n for n, m in q.named_modules() if isinstance(m, LAYERS)]
    splits = {shortcut(n, m): m.split for n, m in q.named_modules()
              if split and isinstance(m, (ResnetBlock, ldm.ResBlock)) and m.split and shortcut(n, m) in names}
    w8 = a8 = fp_in = set()                          # 8-bit weights, 8-bit inputs, FP inputs
    if first_last == "position":
        w8 = a8 = set(first_last_layers(fp, *example))
    elif first_last == "official":
        w8 = {names[0], names[-1]}
        a8 = {names[-2]}                             # a_list[-2]
        fp_in = {names[-1]}

    def act_bits(name):
        return 8 if name in a8 else a_bits

    def make(name, layer):
        wq = AdaRound(layer.weight.data, 8 if name in w8 else w_bits, search, splits.get(name, 0))
        wrap = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        aq = None if name in fp_in or name in splits else ActQuant(act_bits(name))
        return wrap.from_float(layer, wq, aq)

    replace_modules(q, lambda n, m: isinstance(m, LAYERS), make)
    for name, m in q.named_modules():
        if hasattr(m, "act_softmax"):                                # QKᵀ and softmax·V inputs (DDPM, LDM)
            for k in ("act_q", "act_k", "act_v"):
                setattr(m, k, ActQuant(a_bits))
            m.act_softmax = ActQuant(sm_bits)
        if shortcut(name, m) in splits:
            m.shortcut_h = ActQuant(act_bits(shortcut(name, m)))
            m.shortcut_skip = ActQuant(act_bits(shortcut(name, m)))
    return q.to(next(fp.parameters()).device)


@torch.no_grad()
def running_range(x, old, bits, search):
    """The range (lo, hi) of activation x, folded into the running one `old` (None on the first batch). With
    the L_p search: R <- 0.9 R + 0.1 R_new (official UniformAffineQuantizer.update_quantize_range), the
    search on the extremes and a 16k subsample (the search over all of a 256-image batch is slow on CPU).
    Naive PTQ: the overall min/max."""
    v = x.detach().flatten()
    lo, hi = torch.aminmax(v)
    if not search:
        old = old or (lo, hi)
        return torch.minimum(old[0], lo), torch.maximum(old[1], hi)
    sub = torch.cat([torch.stack([lo, hi]), v[torch.randint(len(v), (min(len(v), 16384),), device=v.device)]])
    lo, hi = (r[0, 0] for r in lp_search_range(sub[None], bits, GRID))
    old = old or (lo, hi)                                            # (lo, hi) on the first batch
    return 0.9 * old[0] + 0.1 * lo, 0.9 * old[1] + 0.1 * hi


@torch.no_grad()
def init_acts(q, calib, search, batch=256):
    """Activation ranges (official set_act_quantize_params): weights fake-quantized (nearest), the calibration
    set forwarded in batches of 256; a pre-hook on each activation quantizer updates its range on its input,
    which upstream quantizers already shaped, and the hooks go when the pass is done."""
    switch(q, True)
    ranges = {}                                                      # ActQuant -> running (lo, hi)

    def observe(aq, args):
        ranges[aq] = running_range(args[0], ranges.get(aq), aq.bits, search)
        aq.set_range(*ranges[aq])

    hooks = [m.register_forward_pre_hook(observe) for m in q.modules() if isinstance(m, ActQuant)]
    for b in torch.arange(len(calib["x"])).split(batch):
        q(*net_args(calib, b))
    for h in hooks:
        h.remove()


# -----------------------------------------------------------------------------
# TDAC (paper Sec. III; official scripts/calibration.py, TDAC_cifar_calib_data_generator): FP trajectories,
# density and variety of the middle-block feature per step, counts per step

@torch.no_grad()
def fp_trajectories(d, fp, B, seq, *, batch, eta, cfg_scale, generator, seed):
    """B FP DDIM trajectories of the model `d` (random classes if it is class-conditional; shared out under
    torchrun, η > 0 noise of trajectory i from (seed, i)): the model input x [T_s, B, C, H, W] of every step,
    the latent feature F [T_s, B, C', h, w], the input of the middle attention block (d.feature: mid.attn_1 /
    middle_block.1, as the official code; under guidance 2B rows), and the labels [B] or None. Steps are
    indexed in denoising order, k = 0 the first (noisiest) one."""
    noise = torch.randn(B, *d.shape, generator=generator).to(next(fp.parameters()).device)
    labels = d.labels(B, generator)
    xs, feats = d.trajectories(fp, noise, seq, labels=labels, eta=eta, cfg_scale=cfg_scale, batch=batch,
                               seed=seed, feature=d.feature)          # [B, T_s, ...], guided [B, T_s, 2, ...]
    feats = feats.transpose(0, 1)
    return xs.transpose(0, 1), feats.flatten(1, 2) if feats.dim() == 6 else feats, labels


def tdac_scores(Fk, r):
    """Density D_k = #{j ≠ k : mean((F_k − F_j)²) ≤ r} and
    variety V_k = Σ_{j≠k} Σ_{n,h,w} (1 − cos(F_k, F_j)), the cosine over channels (as the official code:
    torch CosineSimilarity(dim=1, eps=1e-6)). Vectorised: the MSEs from one Gram matrix, and
    V_k = (T_s − 1)·B·h·w − Σ_{n,h,w} (u_k·S − u_k·u_k),
    u the unit channel vectors, S = Σ_j u_j."""
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
    """Integer counts n_k ≈ p_k·N summing exactly to N: floors, then +1 for the largest remainders.
    (The official code rounds and then repairs the sum at the largest counts; the two differ by at most 1.)"""
    exact = p.double() * N
    n = exact.floor().long()
    n[torch.argsort(exact - n, descending=True, stable=True)[:N - int(n.sum())]] += 1
    return n


def tdac_counts(D, V, lam, N):
    """n_k ∝ w_k = D̃_k + λ·Ṽ_k, D̃ and Ṽ min-max normalised over the steps. A constant score
    normalises to 0 rather than NaN; if both are constant every step gets N/T_s."""
    def norm(s):
        return (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else torch.zeros_like(s)

    w = norm(D.double()) + lam * norm(V.double())
    return largest_remainder(w / w.sum() if w.sum() > 0 else torch.ones_like(w) / len(w), N)


def select(x, seq, counts, generator, labels=None):
    """Calibration sample i is trajectory i mod B at step τ_i, τ a random permutation of n_k copies
    of each k (official: the same, one trajectory per sample); its timestep label is
    t_i = seq[T_s − 1 − τ_i], its class that of the trajectory. Uniform counts give the Q-Diffusion-style
    set (as many samples from every step)."""
    tau = torch.repeat_interleave(torch.arange(len(counts)), counts)
    tau = tau[torch.randperm(len(tau), generator=generator)]         # [N]
    b = torch.arange(len(tau)) % x.shape[1]
    data = dict(x=x[tau, b], t=torch.tensor([float(seq[len(seq) - 1 - k]) for k in tau]), idx=tau)
    return data | ({} if labels is None else dict(y=labels[b]))


# -----------------------------------------------------------------------------
# FBR (paper Sec. III; official qdiff/block_recon.py, block_reconstruction): units in execution order, cached
# inputs/targets, the fine-grained loss, AdaRound + learned Δ_a

class _Stop(Exception):
    pass


BLOCKS = (ResnetBlock, AttnBlock, ldm.ResBlock, ldm.AttentionBlock, ldm.BasicTransformerBlock)


def units_in_order(model, example):
    """The reconstruction units in execution order, traced on the inputs `example` (official
    qdiff/recon_block_Qmodel.py): every block of BLOCKS (FBR loss: DDPM ResnetBlock, AttnBlock; LDM ResBlock,
    AttentionBlock, BasicTransformerBlock) and every quantized layer outside them (temb.dense, conv_in, the
    resampling convs, conv_out, an LDM's proj_in/proj_out; layer loss, official qdiff/layer_recon.py)."""
    return in_order(model, example, BLOCKS, (QuantConv2d, QuantLinear))


def inner_layers(unit):
    """FBR's layer terms: the quantized layers of a block in registration order, the last one excluded, as the
    official code (ResnetBlock: conv1, temb_proj [, conv2 when there is a nin_shortcut]; AttnBlock: q, k, v;
    LDM ResBlock: in-conv, emb linear [, out-conv]; BasicTransformerBlock: all but attn2's to_out). A
    single-layer unit has none."""
    return [n for n, m in unit.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))][:-1]


@torch.no_grad()
def unit_io(model, unit, calib, batch, layers=(), cpu_cache=False):
    """Over the calibration set: the inputs of `unit`, its output, and the outputs of its sub-layers
    `layers` (names inside the unit); the forward stops at the unit (official qdiff/data_utils.py,
    save_inp_oup_data). cpu_cache: kept on the CPU in fp16 (the official LDM scripts: on the CPU)."""
    ins, outs = [], []
    inner = {n: [] for n in layers}
    keep = (lambda a: a.to("cpu", torch.float16)) if cpu_cache else (lambda a: a)
    mods = dict(unit.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: inner[n].append(keep(o))) for n in layers]

    def stop(m, args, out):
        ins.append([keep(a) for a in args])
        outs.append(keep(out))
        raise _Stop

    hooks.append(unit.register_forward_hook(stop))
    for b in torch.arange(len(calib["x"])).split(batch):
        try:
            model(*net_args(calib, b))
        except _Stop:
            pass
    for h in hooks:
        h.remove()
    return [torch.cat(a) for a in zip(*ins)], torch.cat(outs), [torch.cat(inner[n]) for n in layers]


def distance(a, b):
    """The reconstruction distance: squared error summed over channels, mean over the rest (official
    quant_layer.py, lp_loss with p = 2)."""
    return (a - b).pow(2).sum(1).mean()


def fbr_loss(y_hat, y, o_hat, o, gamma):
    """FBR: L = d(ŷ, y) + γ·Σ_l d(ô_l, o_l) (official block_reconstruction, γ = add_loss).
    γ = 0 is BRECQ's block-output loss."""
    return distance(y_hat, y) + gamma * sum((distance(a, b) for a, b in zip(o_hat, o)), torch.zeros(()))


def reconstruct_unit(unit, fp_io, x_q, layers, *, gamma, iters, batch, lr_w, lr_a, qdrop, round_reg,
                     generator):
    """One unit: rounding variables V of its layers (Adam, lr_w) and the steps Δ_a of its activation
    quantizers (Adam, lr_a), both cosine-annealed to 0; QDrop on the input (x_q or x_fp per element; the
    time embedding always from the quantized path) and inside (official block_reconstruction, input_prob and
    prob 0.5). fp_io = (x_fp, y_fp, o_fp): the unit's FP inputs, output and the outputs of `layers`; x_q:
    its inputs on the quantized path. Ends hard. Returns the loss of the first and the last mini-batch."""
    x_fp, y_fp, o_fp = fp_io
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
        m.keep = qdrop
    losses, device = [], qlayers[0].weight.device                    # kept on the device: no sync a step
    for it in range(iters):
        b = torch.randperm(len(y_fp), generator=generator)[:batch]  # without replacement
        fetch = lambda a: a[b.to(a.device)].to(device, torch.float32)  # noqa: E731  (from a CPU cache too)
        x_in = torch.where(torch.rand_like(x_q0 := fetch(x_q[0])) < qdrop, x_q0, fetch(x_fp[0]))
        y_hat = unit(x_in, *map(fetch, x_q[1:]))
        loss = fbr_loss(y_hat, fetch(y_fp), [seen[n] for n in layers], list(map(fetch, o_fp)), gamma)
        warm = 0.2 * iters                                 # AdaRound's β 20 -> 2 after 20 % warm-up
        if round_reg > 0 and it >= warm:
            beta = 2 + 18 * (1 - (it - warm) / max(iters - warm, 1))
            loss = loss + round_reg * sum((1 - (2 * m.wq.h() - 1).abs().pow(beta)).sum() for m in qlayers)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        for m in acts:
            m.delta.data.clamp_(min=1e-8)
        losses.append(loss.detach())
    for h in hooks:
        h.remove()
    for m in qlayers:
        m.wq.soft = False                                            # hard rounding 1[V ≥ 0] from here on
        m.wq.V.requires_grad_(False)
    for m in acts:
        m.keep = 1.0
        m.delta.requires_grad_(False)
    return (losses[0].item(), losses[-1].item()) if losses else (None, None)


def reconstruct(fp, q, calib, *, example, gamma, iters, batch, lr_w, lr_a, qdrop, round_reg, generator,
                io_batch=256, cpu_cache=False):
    """Units in execution order: the FP network gives the unit's FP input x_fp, FP output y_fp and FP layer
    outputs o_l; the quantized network (finished units hard-rounded) gives its input x_q."""
    fp_mods, q_mods, log = dict(fp.named_modules()), dict(q.named_modules()), []
    for name in tqdm(units_in_order(q, example), desc="reconstruct"):
        unit = q_mods[name]
        layers = inner_layers(unit) if gamma > 0 else []
        fp_io = unit_io(fp, fp_mods[name], calib, io_batch, layers, cpu_cache)
        switch(q, True)
        x_q, _, _ = unit_io(q, unit, calib, io_batch, cpu_cache=cpu_cache)
        first, last = reconstruct_unit(unit, fp_io, x_q, layers, gamma=gamma, iters=iters, batch=batch,
                                       lr_w=lr_w, lr_a=lr_a, qdrop=qdrop, round_reg=round_reg,
                                       generator=generator)
        log.append(dict(unit=name, loss_first=first, loss_last=last))
    return log


# -----------------------------------------------------------------------------
# Comparison harness: calibration sets, one variant's build/train, evaluation, saving, --load

# tdac: TDAC counts (else uniform over steps); search: L_p ranges (else min-max); reconstruct: AdaRound +
# learned Δ_a unit by unit (else nearest rounding); fbr: FBR's layer terms (else the block-output loss)
VARIANTS = {
    "ptq": dict(tdac=False, search=False, reconstruct=False, fbr=False),    # naive: min-max, nearest rounding
    "brecq": dict(tdac=False, search=True, reconstruct=True, fbr=False),    # Q-Diffusion/BRECQ-style baseline
    "edadm": dict(tdac=True, search=True, reconstruct=True, fbr=True),
    "no_tdac": dict(tdac=False, search=True, reconstruct=True, fbr=True),
    "no_fbr": dict(tdac=True, search=True, reconstruct=True, fbr=False),
}
PANELS = dict(ptq="naive PTQ", brecq="BRECQ-style", edadm="EDA-DM")   # compare.png, next to FP


def check_config(cfg):
    """Checks the flags, fills in what 0 leaves open (bits, the official LRs); returns the ablations asked."""
    cfg.w_bits, cfg.a_bits = resolve_bits(cfg.bits, cfg.w_bits, cfg.a_bits)
    check_bits(sm_bits=cfg.sm_bits)
    ablate = parse_list(cfg.ablate, ("tdac", "fbr"), "--ablate")
    if cfg.first_last not in FIRST_LAST:
        raise UserError(f"--first-last {cfg.first_last!r}: choose from {', '.join(FIRST_LAST)}")
    if not 2 <= cfg.steps <= 1000 or cfg.eta < 0 or cfg.amp not in ("none", "bf16"):
        raise UserError(f"--steps {cfg.steps} / --eta {cfg.eta} / --amp {cfg.amp}: DDIM needs 2..1000 steps "
                        "and η >= 0; --amp is none or bf16")
    if not cfg.load and not cfg.batch <= cfg.calib <= cfg.calib_traj * cfg.steps:   # --load: no calibration
        raise UserError(f"--calib {cfg.calib} must lie in [--batch {cfg.batch}, --calib-traj x --steps = "
                        f"{cfg.calib_traj * cfg.steps}] (the FP trajectories hold that many points)")
    if (cfg.lam < 0 or cfg.radius <= 0 or cfg.gamma < 0 or not 0 < cfg.qdrop <= 1 or cfg.iters < 0
            or cfg.round_reg < 0):
        raise UserError("need --lam >= 0, --radius > 0, --gamma >= 0, 0 < --qdrop <= 1, --iters >= 0, "
                        "--round-reg >= 0")
    lr_w, lr_a = LRS.get(cfg.model, LRS["ddpm"])[cfg.w_bits < 8]
    cfg.lr_w, cfg.lr_a = cfg.lr_w or lr_w, cfg.lr_a or lr_a
    return ablate


def calibration_sets(d, fp, cfg, seq, g):
    """One set of FP trajectories; TDAC and uniform counts select from the same points (under guidance each
    with its unconditional copy): {"tdac": dict(x, t, idx[, y]), "uniform": ...} and the TDAC record."""
    t0 = time.time()
    device = next(fp.parameters()).device
    x_traj, feats, labels = fp_trajectories(d, fp, cfg.calib_traj, seq, batch=cfg.eval_batch, eta=cfg.eta,
                                            cfg_scale=cfg.cfg_scale, generator=g, seed=cfg.seed)
    D, V, mse = tdac_scores(feats.to(device), cfg.radius)
    counts = {"tdac": tdac_counts(D.cpu(), V.cpu(), cfg.lam, cfg.calib),
              "uniform": largest_remainder(torch.ones(cfg.steps) / cfg.steps, cfg.calib)}
    calib = {k: d.with_uncond(select(x_traj, seq, n, g, labels), cfg.cfg_scale) for k, n in counts.items()}
    calib = {k: {a: v.to(device) for a, v in c.items()} for k, c in calib.items()}
    off = mse[~torch.eye(cfg.steps, dtype=torch.bool, device=mse.device)]
    tdac = dict(D=D.tolist(), V=[round(v, 2) for v in V.tolist()], counts=counts["tdac"].tolist(),
                mse_quantiles=torch.quantile(off.float(), torch.tensor([0.1, 0.5, 0.9])).tolist(),
                seconds=time.time() - t0)
    print(f"TDAC (k = 0 is the noisiest step): D {tdac['D']}\n  n_k {tdac['counts']}\n  step-pair feature "
          f"MSE 10/50/90 %: {', '.join(f'{v:.3g}' for v in tdac['mse_quantiles'])} (r = {cfg.radius})")
    return calib, tdac


def build_variant(fp, variant, calib, cfg, example):
    """One quantized model: quantizers placed, activation ranges from its calibration set (TDAC or uniform),
    then, if the variant reconstructs, every unit trained in turn. Returns the model and the loss log."""
    q = quantize(fp, cfg.w_bits, cfg.a_bits, cfg.sm_bits, search=variant["search"], example=example,
                 split=cfg.split, first_last=cfg.first_last)
    data = calib["tdac" if variant["tdac"] else "uniform"]
    init_acts(q, data, variant["search"])
    if not variant["reconstruct"]:
        return q, None
    log = reconstruct(fp, q, data, example=example, gamma=cfg.gamma if variant["fbr"] else 0.0,
                      iters=cfg.iters, batch=cfg.batch, lr_w=cfg.lr_w, lr_a=cfg.lr_a, qdrop=cfg.qdrop,
                      round_reg=cfg.round_reg, generator=torch.Generator().manual_seed(cfg.seed),
                      io_batch=cfg.eval_batch, cpu_cache=cfg.cpu_cache)
    return q, log


def load_variant(fp, state, saved, cfg, example):
    """A quantized model saved by this script (its settings already in cfg), loaded strictly."""
    q = quantize(fp, cfg.w_bits, cfg.a_bits, cfg.sm_bits, search=False, example=example, split=cfg.split,
                 first_last=cfg.first_last)
    if saved["adaround"]:                                            # the state holds V: make room for it
        for m in q.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.wq.init_rounding(m.weight)
    device = next(fp.parameters()).device
    return load_strict(q, {k: v.to(device) for k, v in state.items()}, cfg.load)


# The settings a saved model carries: those that shape its quantizers (a different value on --load is an
# error), and the model, checkpoint, sampler, N and seed it was evaluated with (--load's defaults; flags win)
FIXED = ("bits", "w_bits", "a_bits", "sm_bits", "split", "first_last")
CARRIED = FIXED + ("model", "ckpt", "steps", "eta", "cfg_scale", "n", "eval_batch", "ref", "seed")


def save_variant(q, name, variant, cfg):
    meta = {k: getattr(cfg, k) for k in CARRIED}
    meta |= dict(adaround=variant["reconstruct"], tdac=variant["tdac"], fbr=variant["fbr"])
    save_safetensors(q.state_dict(), os.path.join(cfg.out, f"{name}.safetensors"),
                     metadata=dict(edadm=json.dumps(meta)))


def evaluate(q, ev, cfg, t0):
    """Samples of q from the sampling noise, and its ε-MSE against FP on the held-out points, PSNR against
    the FP samples, FID when possible. ev: d, noise, labels, seq, held, eps_ref, fp_x, device."""
    with sampling_mode(q, amp=cfg.amp, compile=cfg.compile):        # weights quantized once
        x = ev["d"].images(q, ev["noise"], ev["seq"], labels=ev["labels"], eta=cfg.eta,
                           cfg_scale=cfg.cfg_scale, batch=cfg.eval_batch, seed=cfg.seed + 1)
    return x, dict(eps_mse=eps_mse(lambda d: q(*net_args(d)), ev["held"], ev["eps_ref"], cfg.eval_batch),
                   psnr=psnr(x, ev["fp_x"]), fid=fid_or_none(x, cfg.ref, ev["device"]),
                   seconds=time.time() - t0, peak_mb=peak_mb(ev["device"]))


def main():
    cfg = parse_config(Config, PRESETS)
    state = saved = None
    if cfg.load:                     # the file's model brings its preset, its settings override it, flags win
        state, saved = load_saved(cfg.load, "edadm")
        if "first_last" not in saved:
            raise UserError(f"{cfg.load}: saved without its first/last-layer setting; quantize it again")
        cfg = parse_config(Config, PRESETS, saved=saved)
    ablate = check_config(cfg)
    for k in FIXED if saved else ():
        if k in saved and getattr(cfg, k) != saved[k]:
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: {cfg.load} was quantized with "
                            f"{saved[k]}; drop the flag")
    seed_everything(cfg.seed)
    device, t_start = distributed(cfg.device)[2], time.time()      # torchrun: sampling shared out
    d = load_model(cfg.model, cfg.ckpt or None, cfg_scale=cfg.cfg_scale)
    fp = d.net.to(device).requires_grad_(False)
    d.decode.to(device)
    os.makedirs(cfg.out, exist_ok=True)
    seq, example = d.timesteps(cfg.steps), d.example(device)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.n, *d.shape, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    labels = d.labels(cfg.n)
    print(f"{cfg.model}, W{cfg.w_bits}A{cfg.a_bits} (softmax {cfg.sm_bits}), DDIM-{cfg.steps} η {cfg.eta}, "
          f"N = {cfg.calib} from {cfg.calib_traj} trajectories, λ {cfg.lam}, r {cfg.radius}, γ {cfg.gamma}, "
          f"{cfg.iters} iterations/unit, lr_w {cfg.lr_w:g}, lr_a {cfg.lr_a:g}, {cfg.n} samples, {device}")

    # FP: reference samples, and held-out ε-MSE points from its trajectories of the first 64 sampling noises
    t0 = time.time()
    with sampling_mode(fp, amp=cfg.amp, compile=cfg.compile):
        fp_x = d.images(fp, noise, seq, labels=labels, eta=cfg.eta, cfg_scale=cfg.cfg_scale,
                        batch=cfg.eval_batch, seed=cfg.seed + 1)
    held = d.points(fp, noise[:64], seq, g, labels=None if labels is None else labels[:64], eta=cfg.eta,
                    cfg_scale=cfg.cfg_scale)
    ev = dict(d=d, noise=noise, labels=labels, seq=seq, held=held, fp_x=fp_x, device=device,
              eps_ref=predict(lambda c: fp(*net_args(c)), held, cfg.eval_batch))
    results = {"fp": dict(eps_mse=0.0, psnr=None, fid=fid_or_none(fp_x, cfg.ref, device),
                          seconds=time.time() - t0, peak_mb=peak_mb(device))}
    save_grid(fp_x[:64], os.path.join(cfg.out, "grid_fp.png"))
    calib, tdac = calibration_sets(d, fp, cfg, seq, g) if not saved else (None, None)

    panels = {"FP": fp_x[:32]}
    for name in ["loaded"] if saved else ["ptq", "brecq", "edadm"] + [f"no_{a}" for a in ablate]:
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(cfg.seed)                      # every variant: the same QDrop/batch draws
        if saved:
            q, log = load_variant(fp, state, saved, cfg, example), None
        else:
            q, log = build_variant(fp, VARIANTS[name], calib, cfg, example)
        switch(q, True)
        x, results[name] = evaluate(q, ev, cfg, t0)
        results[name]["reconstruction"] = log
        save_grid(x[:64], os.path.join(cfg.out, f"grid_{name}.png"))
        if not saved:
            save_variant(q, name, VARIANTS[name], cfg)
        del q                                                        # freed before the next one is built
        if name in PANELS:
            panels[f"{PANELS[name]} W{cfg.w_bits}A{cfg.a_bits}"] = x[:32]
        print(f"{name}: {results[name]['seconds']:.0f} s")

    print_table(results)
    if not saved:
        save_panels(panels, os.path.join(cfg.out, "compare.png"))
    write_record(os.path.join(cfg.out, "results.json"), asdict(cfg) | dict(sampler=d.sampler),
                 results | ({"tdac": tdac} if tdac else {}), time.time() - t_start, device)


if __name__ == "__main__":
    run_main(main)
