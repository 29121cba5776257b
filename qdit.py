"""
Q-DiT: accurate post-training quantization for diffusion transformers (Chen, Xie et al., CVPR 2025,
arXiv 2406.17343; code Juanerx/Q-DiT @519d24a). Spec: ../shared/specs/qdit.md. W4A8 PTQ of a DiT:

  §2  Group-wise quantization: the weights and input activations of each Linear in contiguous groups of
      g along the input channel, one (s, z) per group; a layer's weights and activations share g.
  §3  GPTQ (Frantar et al. 2023) for the final weights: column by column, each rounding error is pushed
      onto the columns not yet quantized through the inverse Hessian of the layer's inputs.
  §4  Sample-wise dynamic activation quantization: the (s, z) of every token's groups are taken at every
      call, so per sample and per timestep; nothing is calibrated. A static variant for the ablation.
  §7  Automatic granularity allocation: an evolutionary search over one g per Linear under a mean-g
      budget; fitness the FID of a small sample set (or, without the Inception, the distance to FP).

One run measures the paper's ablation ladder (spec §11.3) on one calibration set and one set of
sampling noise and labels: FP; naive RTN (per-output-channel weights, per-tensor static activations);
fixed g with static activations; fixed g dynamic (Q-DiT without the search); the searched g. It prints a
table and writes results.json, a PNG grid and the quantized state of each rung, and the searched
configuration, which --load reuses.

    python qdit.py                                # bundled DiT, quick preset with a small search (2-core CPU)
    python qdit.py --no-search --group-size 32    # the fixed-g ladder only
    python qdit.py --model dit-xl-2-256 --search --ref VIRTUAL_imagenet256_labeled.npz   # the paper's (GPU)
    python qdit.py --load runs/qdit/searched_config.json   # FP and the searched rung from a saved configuration
    python qdit.py --load runs/qdit/searched.safetensors   # sample a saved quantized model again
"""
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from common import (CACHE, CHECKPOINTS, QuantLinear, UserError, atomic_write, ddim_sample, ddim_timesteps, eps_mse,
                    fake_quant, linear_alphas_cumprod, load_saved, load_strict, minmax_range, parse_config,
                    pick_device, psnr, qrange, quant_params, replace_modules, run_main, save_grid, save_safetensors,
                    seed_everything, to_rows, write_record)
from dilatequant import fid_or_none, peak_mb  # FID when the Inception is cached; process peak memory
from models.dit import CONFIGS, eps_fn, load_dit
from models import vae as sd_vae

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration: the paper's settings (spec §12, §14), and a quick preset for the bundled model

@dataclass
class Config:
    """Q-DiT (arXiv 2406.17343): FP, naive RTN, fixed-g static, fixed-g dynamic and searched g in one run."""
    model: str = "dit-cifar10-small"  # dit-cifar10-small (bundled, pixel space) or dit-xl-2-256 / dit-xl-2-512 (paper)
    ckpt: str = ""                 # weights file for --model (default: the model's own checkpoint)
    vae: str = "sd-vae-ft-mse"     # decoder of the dit-xl-2 latents, a name or a file (Q-DiT's --vae mse, spec §8.1)
    w_bits: int = 4                # weight bits (paper: W4A8, W6A8)
    a_bits: int = 8                # activation bits
    group_size: int = 128          # g of the fixed-g rungs and of the adaLN weights; 0: one group per row (§2.3)
    w_sym: bool = False            # symmetric final weights (quant_main.sh: asymmetric)
    a_sym: bool = False            # symmetric final activations (quant_main.sh: asymmetric)
    include_zero: bool = False     # widen every min-max range to hold 0 (official: no, z is clamped instead; D8)
    gptq: bool = True              # final weights by GPTQ (§3); --no-gptq: round to nearest
    blocksize: int = 128           # GPTQ column block (§3)
    damp: float = 0.01             # GPTQ dampening, a fraction of mean diag(H) (§3)
    quant_adaln: bool = True       # quantize adaLN_modulation.1 weights too (weights only, g = --group-size; D6)
    steps: int = 100               # DDIM steps, DiT's even respacing, η = 0 (§9; paper: 100 at 256 px, 50 at 512)
    cfg_scale: float = 1.5         # classifier-free guidance on output channels 0-2 (§8.3); <= 1: none
    calib: int = 256               # calibration triples (x_t, t, y), one step of each FP trajectory (§6)
    calib_batch: int = 16          # trajectories per calibration batch; their steps are distinct (§6)
    calib_steps: int = 50          # DDIM steps of the calibration trajectories (§6)
    search: bool = False           # evolutionary search over one g per Linear (§7): the ladder's last rung
    space: str = "32,64,128,192,288"  # the g a gene may take (§7.2)
    budget: int = 128              # constraint: mean g >= budget (official; D12)
    bitops: bool = False           # constraint on BitOps instead: Σ d_out·d_in/g at most that of uniform g = budget (§7.3)
    population: int = 50           # EA population N_p (§7.5)
    topk: int = 10                 # elite K kept across epochs
    crossover: int = 25            # crossover children per epoch
    mutation: int = 25             # mutation children per epoch
    p_mut: float = 0.1             # per-gene mutation probability
    epochs: int = 10               # EA epochs
    fitness: str = "auto"          # fid (Inception and --ref), mse (sample distance to FP's), auto: fid when possible
    fit_n: int = 800               # samples per fitness evaluation (official: 800)
    fit_steps: int = 50            # DDIM steps of a fitness evaluation (official: 50)
    fit_seed: int = 1234           # seed of the fitness noise and labels, the same for every candidate (D4)
    search_final: bool = False     # search with the final W/A symmetry and CFG (official: symmetric, no CFG; D9)
    n: int = 10000                 # samples per rung for FID / PSNR / the grid (D10: 10k)
    eval_batch: int = 16           # images per sampling batch (official: 16; CFG doubles the forward batch)
    ref: str = ""                  # FID reference statistics .npz (ADM ref batch, eval_fid --save-stats); empty: no FID
    seed: int = 0                  # seed of calibration and the EA; seed + 1: sampling noise and labels
    device: str = "auto"           # auto, cpu or cuda
    out: str = "runs/qdit"         # results.json, grids, quantized states, searched_config.json
    load: str = ""                 # searched_config.json (its g, no search) or a saved rung .safetensors (sampled again)


# Defaults follow the model: the paper's settings for DiT-XL/2; for the bundled DiT a preset sized for a 2-core CPU
# (<= 10 min for the default command, search included; measured by parts on one thread: ~11 min, of which FID of
# 5 x 256 samples 4.3, the 32 fitness evaluations 3, sampling 3; two threads run the forward 1.6x faster). Its
# Linears are 128 and 512 wide, so the paper's g = 128 would be a whole row for three of four layers; g = 64 with
# genes {16, 32, 64, 128} and budget 64 has the paper's shape (uniform g at the budget, genes from a quarter of it
# to twice it). Flags given on the command line win.
PRESETS = {
    "dit-cifar10-small": dict(group_size=64, space="16,32,64,128", budget=64, steps=20, calib=128, calib_steps=20,
                              search=True, population=8, topk=3, crossover=4, mutation=4, epochs=3, fit_n=32,
                              fit_steps=10, n=256, eval_batch=64,
                              ref=os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")),
    "dit-xl-2-256": dict(steps=100),
    "dit-xl-2-512": dict(steps=50),
}
LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # quantized Linears of a block, in gene order (§5, §7.2)


def gene_layers(net):
    """Names of the searched Linears: gene 4·i + j is layer j of block i (evolution.py's order). A searched
    configuration is one g per layer, applied per layer everywhere (D5: quant_main.py indexes its lists per
    block, so the official 112-gene result cannot reach the final model)."""
    return [f"blocks.{i}.{name}" for i in range(len(net.blocks)) for name in LAYERS]


# -----------------------------------------------------------------------------
# §2 Group-wise fake quantization along the input channel, weights by round-to-nearest

def qparams(lo, hi, bits, sym, include_zero):
    """(s, z) of Q-DiT's quantizer (§2.1-2.2, official quant.py): the min-max range as it is (0 not forced
    in, z clamped to the grid: D8) with the official floor 1e-5 on hi − lo (asymmetric) or on max|x|."""
    return quant_params(lo, hi, bits, sym, include_zero, eps=1e-5 if sym else 1e-5 / (2 ** bits - 1))


def rtn(W, bits, g, sym, include_zero=False):
    """W [d_out, d_in] rounded to nearest, one (s, z) per output row and group of g input channels (§2.3)."""
    rows = to_rows(W, "group", g or W.shape[1])                     # [d_out·d_in/g, g]
    s, z = qparams(*minmax_range(rows), bits, sym, include_zero)    # [d_out·d_in/g, 1] each
    return fake_quant(rows, s, z, *qrange(bits, sym)).reshape(W.shape)


def fake_quant_(x, s, z, qmin, qmax):
    """common.fake_quant for inference, with the same values: no straight-through estimator (nothing here
    takes gradients) and in place on one fresh tensor. The dynamic quantizers run on every activation of
    every call, the hot loop of sampling: a W4A8 forward of the bundled model is ~1.7x faster with this."""
    return torch.div(x, s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


class ActQuant(nn.Module):
    """The input quantizer of one Linear, in groups of g along the input channel (§2.3). Dynamic (§4.1): the
    min-max (s, z) of every token's every group, taken at each call, so per sample and per timestep (CFG's
    null-class half included); nothing is stored. Static (§4.3, the ablation): one (s, z) per channel group,
    shared by all tokens, samples and steps, from min/max over calibration batches; g = d_in: per tensor."""

    def __init__(self, bits, g, sym, dynamic, include_zero=False):
        super().__init__()
        self.bits, self.g, self.sym, self.dynamic, self.include_zero = bits, g, sym, dynamic, include_zero
        self.observing = False
        self.register_buffer("lo", None), self.register_buffer("hi", None)  # static: [d/g, 1] each

    def forward(self, x):
        xg = to_rows(x, "group", self.g).reshape(-1, x.shape[-1] // self.g, self.g)  # [tokens, d/g, g]
        if self.observing:  # official get_act_scales: stat = 0.9·stat + 0.1·(this batch's min/max), input unchanged
            lo, hi = xg.amin((0, 2))[:, None], xg.amax((0, 2))[:, None]           # [d/g, 1]
            old = self.lo is not None
            self.lo, self.hi = (0.9 * self.lo + 0.1 * lo, 0.9 * self.hi + 0.1 * hi) if old else (lo, hi)
            return x
        if self.dynamic:
            lo, hi = xg.amin(2, keepdim=True), xg.amax(2, keepdim=True)             # [tokens, d/g, 1]
        else:
            lo, hi = self.lo, self.hi                                               # [d/g, 1], every token
        s, z = qparams(lo, hi, self.bits, self.sym, self.include_zero)
        return fake_quant_(xg, s, z, *qrange(self.bits, self.sym)).reshape(x.shape)


# -----------------------------------------------------------------------------
# §5 Which layers: qkv, proj, fc1, fc2 of every block (weights and inputs), adaLN_modulation.1 (weights, D6).
# Attention matmuls, embeddings, the final layer, norms and gates stay FP (§5, D7).

def quantize(fp, genes, a_bits, a_sym, act, adaln_g, include_zero=False):
    """A copy of fp with §5's Linears wrapped (R7) and their weights still FP. The four Linears of block i
    get an input quantizer with their gene's g (act: dynamic, static, or tensor = static with one group)
    and keep g (m.g) for their weights: one gene sets both (D2; the official search only ever changed the
    weights' g). adaLN_modulation.1 keeps adaln_g (None: left FP)."""
    g_of = dict(zip(gene_layers(fp), genes))
    if adaln_g is not None:
        g_of |= {f"blocks.{i}.adaLN_modulation.1": adaln_g for i in range(len(fp.blocks))}

    def make(name, layer):
        g = g_of[name] or layer.in_features                             # 0: one group per row
        if layer.in_features % g:
            raise UserError(f"group size {g} does not divide the {layer.in_features} input channels of {name}")
        aq = None if name.endswith("adaLN_modulation.1") else ActQuant(
            a_bits, layer.in_features if act == "tensor" else g, a_sym, act == "dynamic", include_zero)
        m = QuantLinear.from_float(layer, aq=aq)
        m.quant_a, m.g = aq is not None, g
        return m
    return replace_modules(copy.deepcopy(fp), lambda name, m: name in g_of, make)


def qlinears(q):
    return [m for m in q.modules() if isinstance(m, QuantLinear)]


@torch.no_grad()
def rtn_weights(q, bits, sym, include_zero=False):
    for m in qlinears(q):
        m.weight.data = rtn(m.weight.data, bits, m.g, sym, include_zero)


@torch.no_grad()
def calibrate_static(q, calib, batch):
    """§4.3: the static ranges from the FP model's inputs (quantizers observing, not quantizing), `batch` at a time."""
    aqs = [m.aq for m in qlinears(q) if m.quant_a and not m.aq.dynamic]
    for aq in aqs:
        aq.observing, aq.lo, aq.hi = True, None, None
    for b in torch.arange(len(calib["x"])).split(batch):
        q(calib["x"][b], calib["t"][b], calib["y"][b])
    for aq in aqs:
        aq.observing = False


# -----------------------------------------------------------------------------
# §3 GPTQ with a group size per layer (D1)

def gptq_params(w, bits, sym):
    """GPTQ's own min-max quantizer (official Quantizer_GPTQ, §3), one (s, z) per row of w [d_out, g]: the
    range always holds 0 and [0, 0] becomes [−1, 1]; symmetric keeps the 2^b codes and centres them at
    z = 2^(b−1), s = 2·max|w|/(2^b − 1). Codes are 0..2^b − 1 either way."""
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)   # [d_out, 1]
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)
    both0 = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both0, -1.0, lo), torch.where(both0, 1.0, hi)
    s = (hi - lo) / (2 ** bits - 1)
    return s, torch.full_like(s, 2 ** (bits - 1)) if sym else torch.round(-lo / s)


@torch.no_grad()
def gptq(W, H, bits, g, sym, blocksize=128, damp=0.01):
    """GPTQ (Frantar et al. 2023, Algorithm 1; official gptq.py without act-order) with one (s, z) per row and
    group of g input columns. Goal: a grid-valued Q with a small ||W X − Q X||², H = 2 X Xᵀ. Columns are
    rounded left to right; rounding column k leaves the error w_k − q_k, and the optimal change of the columns
    not yet rounded (OBS) is W[:, k:] −= (w_k − q_k)/[H_k⁻¹]_kk · [H_k⁻¹]_k,k:, H_k⁻¹ the inverse Hessian of the
    columns ≥ k. Row k of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) is that row of H_k⁻¹ over √[H_k⁻¹]_kk,
    so the update is W[:, k:] −= e·U_k,k: with e = (w_k − q_k)/U_kk, and one factorisation serves every k."""
    W, H = W.detach().clone().float(), H.clone()                    # [d_out, d_in], [d_in, d_in]
    d_in, g = W.shape[1], g or W.shape[1]
    dead = torch.diag(H) == 0                                       # inputs that are always 0: their weights
    H[dead, dead] = 1                                               # never matter; set them to 0
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())                  # + λI, λ = damp·mean diag(H): H⁻¹ is stable
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)   # [d_in, d_in]
    Q = torch.zeros_like(W)
    for i1 in range(0, d_in, blocksize):  # lazy batch updates: within a block column by column, later blocks at once
        i2 = min(i1 + blocksize, d_in)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])   # [d_out, block]: working copy, scaled errors
        for k in range(i2 - i1):
            c = i1 + k
            if c % g == 0:  # a new group: its (s, z) from W, which has the earlier blocks' updates but not this
                s, z = gptq_params(W[:, c:c + g], bits, sym)         # block's (they are in W1): as official gptq.py
            q = fake_quant(W1[:, k:k + 1], s, z, 0, 2 ** bits - 1)  # [d_out, 1], on the group's grid
            Q[:, c] = q[:, 0]
            e = (W1[:, k] - q[:, 0]) / U[c, c]                       # [d_out]
            W1[:, k:] -= e[:, None] * U[c, c:i2][None]              # the block's later columns absorb the error
            E1[:, k] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]                              # ... and all later blocks, in one matmul
    return Q


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


@torch.no_grad()
def gptq_model(q, calib, bits, sym, blocksize, damp, batch):
    """§3 in the GPTQ driver shape (R8): catch the inputs of block 0, then block by block: hooks gather
    H = 2/n Σ x xᵀ of every wrapped Linear's input as the quantized model sees it (activation quantizers on,
    earlier blocks already quantized), GPTQ each with its own g (D1), and the block's quantized outputs are
    the next block's inputs. Official quant_main.py runs the whole model once per block instead: the same
    inputs, depth times the cost. Calibration forwards are plain conditional ones (§6)."""
    xs = []

    def catch(module, args):
        xs.append(args)                                             # (x [B, T, D], c [B, D])
        raise _Stop
    h = q.blocks[0].register_forward_pre_hook(catch)
    for b in torch.arange(len(calib["x"])).split(batch):
        try:
            q(calib["x"][b], calib["t"][b], calib["y"][b])
        except _Stop:
            pass
    h.remove()
    for block in tqdm(q.blocks, desc="GPTQ", leave=False):
        layers = [m for m in block.modules() if isinstance(m, QuantLinear)]
        H, n = {m: 0.0 for m in layers}, {m: 0 for m in layers}

        def gather(m, args, out):
            x = m.aq(args[0]) if m.quant_a else args[0]             # the fake-quantized input the layer sees
            x = x.reshape(-1, x.shape[-1]).float()                  # [tokens, d_in]
            H[m], n[m] = H[m] + x.T @ x, n[m] + len(x)
        hooks = [m.register_forward_hook(gather) for m in layers]
        for x, c in xs:
            block(x, c)
        for h in hooks:
            h.remove()
        for m in layers:
            m.weight.data = gptq(m.weight, 2 * H[m] / n[m], bits, m.g, sym, blocksize, damp).to(m.weight.dtype)
        xs = [(block(x, c), c) for x, c in xs]


# -----------------------------------------------------------------------------
# §6 Calibration and §9 sampling: DDIM η = 0 over DiT's respaced linear schedule, CFG on channels 0-2

@torch.no_grad()
def calibration_set(fp, n, batch, seq, abar, cfg_scale, shape, generator, device):
    """§6 (collect_cali_data.py): FP DDIM + CFG trajectories from noise and uniform labels, `batch` at a
    time; per batch, steps drawn without replacement, step j for trajectory j: one (x_t, t, y) per
    trajectory, distinct steps within a batch. x_t is the conditional half; no null-class entries."""
    xs, ts, ys = [], [], []
    for _ in range(-(-n // batch)):
        z = torch.randn(batch, *shape, generator=generator).to(device)
        y = torch.randint(fp.num_classes, (batch,), generator=generator).to(device)
        _, traj = ddim_sample(eps_fn(fp, y, cfg_scale), z, seq, abar, trajectory=True)   # [(x_t, t, i)], from T
        steps = torch.randperm(len(seq), generator=generator)[:batch].tolist()
        xs += [traj[k][0][j] for j, k in enumerate(steps)]
        ts += [float(traj[k][1]) for k in steps]
        ys.append(y.cpu())
    return dict(x=torch.stack(xs)[:n].to(device), t=torch.tensor(ts)[:n].to(device), y=torch.cat(ys)[:n].to(device))


def to_float(u8):
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1               # [N, H, W, 3] uint8 -> [N, 3, H, W] in [−1, 1]


@torch.no_grad()
def sample(net, noise, labels, seq, abar, cfg_scale, batch, vae=None, progress=True):
    """DDIM from the given noise and labels, through the VAE for latent models, as uint8 [N, H, W, 3]:
    what FID reads, and 10k images at 256 px fit in memory only as bytes. fp32 throughout (D11)."""
    out = []
    for xb, yb in tqdm(list(zip(noise.split(batch), labels.split(batch))), desc="sampling", leave=False,
                       disable=not progress):
        x = ddim_sample(eps_fn(net, yb, cfg_scale), xb, seq, abar)
        x = vae.decode(x) if vae is not None else x                 # [B, 3, H, W], about [−1, 1]
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def psnr_u8(x, ref, chunk=500):
    return sum(psnr(to_float(x[i:i + chunk]), to_float(ref[i:i + chunk])) * len(x[i:i + chunk])
               for i in range(0, len(x), chunk)) / len(x)


# -----------------------------------------------------------------------------
# §7 Automatic granularity allocation: evolutionary search over one g per Linear

def evolution(fitness, n_genes, space, legal, start, cfg, rng):
    """§7.5 (evolution.py; Algorithm 1): minimise fitness over g vectors with the constraint `legal`.
    The population starts with `start` (official: uniform [128]·112) and random legal vectors; every
    epoch merges it into the elite (the best K ever seen: elitist, D3), then breeds `mutation` children
    (a random elite parent, each gene redrawn with probability p_mut) and `crossover` children (two
    parents, each gene from either with probability 1/2), at most 10 tries per child, and refills with
    random vectors. A candidate is evaluated once, when first proposed, and only if legal. After the
    last epoch one more merge (the official loop never merges its last generation, D3). rng is private (D4)."""
    seen, pop, history = {}, [], []

    def consider(cand):
        cand = tuple(cand)
        if cand not in seen and legal(cand):
            seen[cand] = fitness(cand)
            pop.append(cand)

    def breed(make, k):
        before = len(pop)
        for _ in range(10 * k):
            if len(pop) - before >= k:
                break
            consider(make())

    def refill():
        breed(lambda: [rng.choice(space) for _ in range(n_genes)], cfg.population - len(pop))

    consider(start)
    refill()
    elite = []
    for epoch in tqdm(range(cfg.epochs), desc="search", leave=False):
        elite = sorted(set(elite) | set(pop), key=lambda c: (seen[c], c))[:cfg.topk]
        pop.clear()
        breed(lambda: [rng.choice(space) if rng.random() < cfg.p_mut else v for v in rng.choice(elite)], cfg.mutation)
        breed(lambda: [a if rng.random() < 0.5 else b for a, b in zip(rng.choice(elite), rng.choice(elite))],
              cfg.crossover)
        refill()
        history.append(dict(epoch=epoch, best=seen[elite[0]], evaluated=len(seen)))
    elite = sorted(set(elite) | set(pop), key=lambda c: (seen[c], c))[:cfg.topk]
    return list(elite[0]), seen[elite[0]], dict(evaluated=len(seen), history=history,
                                                elite=[dict(genes=list(c), fitness=seen[c]) for c in elite])


def constraint(fp, budget, bitops):
    """D12: legal iff mean g >= budget (official), or with bitops iff the g-dependent part of the BitOps,
    Σ_l d_out·d_in/g_l (one rescale per output and group; §7.3, tokens cancel), is at most uniform g = budget's."""
    mods = dict(fp.named_modules())
    cost = [mods[name].in_features * mods[name].out_features for name in gene_layers(fp)]
    if bitops:
        return lambda c: sum(w / g for w, g in zip(cost, c)) <= sum(cost) / budget * (1 + 1e-9)
    return lambda c: sum(c) >= budget * len(c)


def fid_few(f, mu_r, sigma_r):
    """The FID of n samples' Inception features f [n, 2048] against (μ_r, Σ_r), exactly, without the 2048²
    matrix square root that costs seconds on a CPU: Σ_g = A Aᵀ with A = (f − μ_g)ᵀ/√(n − 1), and Σ_r Σ_g has
    the nonzero eigenvalues of the n×n PSD matrix Aᵀ Σ_r A, so Tr (Σ_r Σ_g)^½ = Σ √λ. float64."""
    mu = f.mean(0)
    A = (f - mu).T / math.sqrt(len(f) - 1)                         # [2048, n]
    lam = torch.linalg.eigvalsh(A.T @ sigma_r @ A).clamp(min=0)    # [n]
    return ((mu - mu_r).pow(2).sum() + sigma_r.trace() + A.pow(2).sum() - 2 * lam.sqrt().sum()).item()


def fitness_fn(fp, cfg, kind, shape, vae, device):
    """§7.4: the loss of a g vector. The FP model with dynamic activation quantizers at the candidate's g and
    RTN weights (the search never runs GPTQ), symmetric and without CFG unless --search-final (D9); the
    adaLN weights at --group-size. The same noise and labels for every candidate (common random numbers
    from a private generator, D4). kind fid: FID of the samples against --ref (Inception features as
    eval_fid.statistics computes them); mse: their mean squared distance to the FP samples from the same noise."""
    w_sym, a_sym, scale = (cfg.w_sym, cfg.a_sym, cfg.cfg_scale) if cfg.search_final else (True, True, 1.0)
    g = torch.Generator().manual_seed(cfg.fit_seed)
    noise = torch.randn(cfg.fit_n, *shape, generator=g).to(device)
    labels = torch.randint(fp.num_classes, (cfg.fit_n,), generator=g).to(device)
    seq, abar, names = ddim_timesteps("even", cfg.fit_steps), linear_alphas_cumprod(), gene_layers(fp)
    q = quantize(fp, [cfg.group_size] * len(names), cfg.a_bits, a_sym, "dynamic",
                 cfg.group_size if cfg.quant_adaln else None, cfg.include_zero)
    mods = dict(q.named_modules())
    w_fp = {name: mods[name].weight.detach().clone() for name in names}
    rtn_weights(q, cfg.w_bits, w_sym, cfg.include_zero)             # adaLN at --group-size, fixed
    run = lambda net: sample(net, noise, labels, seq, abar, scale, cfg.eval_batch, vae, progress=False)  # noqa: E731
    if kind == "fid":
        import eval_fid
        inception = eval_fid.load_inception().to(device, memory_format=torch.channels_last)   # as eval_fid does
        ref = eval_fid.read_input(cfg.ref)
        ref = ref if isinstance(ref, tuple) else eval_fid.statistics(ref, inception, 50, device)[:2]
        mu_r, sigma_r = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in ref)

        def score(x):  # uint8 [n, H, W, 3] -> [0, 1], resized to 299 inside the Inception (eval_fid's contract)
            f = torch.cat([inception(xb.to(device).permute(0, 3, 1, 2).float() / 255) for xb in x.split(50)])
            return fid_few(f.double(), mu_r, sigma_r)
    else:
        x_fp = to_float(run(fp))
        score = lambda x: (to_float(x) - x_fp).pow(2).mean().item()  # noqa: E731

    @torch.no_grad()
    def fitness(genes):
        for name, gene in zip(names, genes):
            m = mods[name]
            m.g = m.aq.g = gene                                         # weights and activations (D2)
            m.weight.data = rtn(w_fp[name], cfg.w_bits, gene, w_sym, cfg.include_zero)
        return score(run(q))
    return fitness


# -----------------------------------------------------------------------------
# The ladder

def main():
    cfg = parse_config(Config, PRESETS)
    for what, b in (("--w-bits", cfg.w_bits), ("--a-bits", cfg.a_bits)):
        if not 2 <= b <= 8:
            raise UserError(f"{what} = {b}: bits must be within 2..8")
    try:
        space = sorted({int(v) for v in cfg.space.split(",")})
    except ValueError:
        raise UserError(f"--space {cfg.space!r}: comma-separated group sizes, e.g. 32,64,128") from None
    if min(space) <= 0 or cfg.group_size < 0 or cfg.budget <= 0 or max(space) < cfg.budget:
        raise UserError(f"need group sizes > 0, --group-size >= 0 and 0 < --budget {cfg.budget} <= max(--space)")
    if not 2 <= cfg.steps <= 1000 or not 2 <= cfg.calib_steps <= 1000 or not 2 <= cfg.fit_steps <= 1000:
        raise UserError("--steps, --calib-steps and --fit-steps must lie in 2..1000")
    if not 1 <= cfg.calib_batch <= cfg.calib_steps or cfg.calib < 1 or cfg.n < 1 or cfg.fit_n < 2:
        raise UserError(f"need 1 <= --calib-batch <= --calib-steps (distinct steps per batch), --calib >= 1, "
                        f"--n >= 1, --fit-n >= 2")
    if min(cfg.population, cfg.topk, cfg.epochs) < 1 or min(cfg.crossover, cfg.mutation) < 0 or not 0 <= cfg.p_mut <= 1:
        raise UserError("need --population, --topk, --epochs >= 1, --crossover, --mutation >= 0, 0 <= --p-mut <= 1")
    if cfg.fitness not in ("auto", "fid", "mse"):
        raise UserError(f"--fitness {cfg.fitness!r}: choose auto, fid or mse")
    loaded, searched = None, None
    if cfg.load.endswith(".json"):
        if not os.path.isfile(cfg.load):
            raise UserError(f"{cfg.load}: no such file")
        with open(cfg.load) as f:
            searched = json.load(f)
        if not isinstance(searched, dict) or "group_sizes" not in searched:
            raise UserError(f"{cfg.load}: not a configuration written by qdit.py (no group_sizes)")
        cfg.model, cfg.search = searched["model"], False
    elif cfg.load:
        st, loaded = load_saved(cfg.load, "qdit")   # its config is in the file's metadata
        cfg.model, cfg.search = loaded["model"], False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # GPTQ's maths in fp32 (R10)
    seed_everything(cfg.seed)
    device, t_start = pick_device(cfg.device), time.time()
    fp = load_dit(cfg.model, cfg.ckpt or None).to(device).requires_grad_(False)
    vae = None
    if fp.in_channels == 4:  # SD-VAE latents: --vae is a VAE name of models/vae.py or a file of the SD VAE's weights
        vae = sd_vae.load_vae(*(cfg.vae, None) if cfg.vae in sd_vae.CONFIGS else ("sd-vae-ft-mse", cfg.vae))
        vae = vae.to(device).requires_grad_(False)
    names, mods = gene_layers(fp), dict(fp.named_modules())
    widths = sorted({mods[name].in_features for name in names})
    for g in space + [cfg.group_size]:
        if g and any(w % g for w in widths):
            raise UserError(f"group size {g} does not divide the Linear input widths {widths} of {cfg.model}")
    if searched is not None and (searched.get("layers") != names or any(g <= 0 or w % g for w, g in zip(
            [mods[name].in_features for name in names], searched["group_sizes"]))):
        raise UserError(f"{cfg.load}: its layers or group sizes do not fit {cfg.model}")
    kind = cfg.fitness
    if kind == "auto":  # FID when the Inception weights are cached and there is a reference, else the FP distance
        cached = any(os.path.isfile(os.path.join(CACHE, CHECKPOINTS[k][2])) for k in ("inception-torchscript",
                                                                                      "inception-pytorch-fid"))
        kind = "fid" if cfg.ref and cached else "mse"
    if kind == "fid" and not cfg.ref:
        raise UserError("--fitness fid needs --ref (FID reference statistics)")
    os.makedirs(cfg.out, exist_ok=True)
    size = CONFIGS[cfg.model]["input_size"]
    shape = (fp.in_channels, size, size)
    seq, abar = ddim_timesteps("even", cfg.steps), linear_alphas_cumprod()
    g = torch.Generator().manual_seed(cfg.seed)
    gen_n = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn(cfg.n, *shape, generator=gen_n).to(device)
    labels = torch.randint(fp.num_classes, (cfg.n,), generator=gen_n).to(device)
    print(f"{cfg.model}, W{cfg.w_bits}A{cfg.a_bits}, g {cfg.group_size}, DDIM-{cfg.steps} (even), CFG {cfg.cfg_scale}, "
          f"{cfg.calib} calibration samples, GPTQ {cfg.gptq}, N = {cfg.n}, {device}")

    # FP: reference samples, and held-out ε-MSE inputs from its own trajectories (not the calibration ones)
    t0 = time.time()
    fp_x = sample(fp, noise, labels, seq, abar, cfg.cfg_scale, cfg.eval_batch, vae)
    h = min(32, cfg.n)
    _, traj = ddim_sample(eps_fn(fp, labels[:h], cfg.cfg_scale), noise[:h], seq, abar, trajectory=True)
    pick = torch.randperm(len(traj) * h, generator=g)[:512]
    held = dict(x=torch.cat([x for x, _, _ in traj])[pick].to(device),
                t=torch.cat([torch.full((h,), float(t)) for _, t, _ in traj])[pick].to(device),
                y=labels[:h].repeat(len(traj))[pick])
    guided = lambda net: lambda x, t, y: eps_fn(net, y, cfg.cfg_scale)(x, t)   # noqa: E731  (the ε DDIM uses)
    with torch.no_grad():
        eps_ref = torch.cat([guided(fp)(held["x"][b], held["t"][b], held["y"][b])
                             for b in torch.arange(len(pick)).split(cfg.eval_batch)])
    results = {"fp": dict(eps_mse=0.0, psnr=None, fid=fid_or_none(fp_x, cfg.ref), seconds=time.time() - t0,
                          peak_mb=peak_mb(device), mean_g=None)}
    save_grid(to_float(fp_x[:64]), os.path.join(cfg.out, "grid_fp.png"))

    calib, search_log = None, None
    if loaded is None:
        t0 = time.time()
        calib = calibration_set(fp, cfg.calib, cfg.calib_batch, ddim_timesteps("even", cfg.calib_steps), abar,
                                cfg.cfg_scale, shape, g, device)
        results["calibration"] = dict(seconds=time.time() - t0, n=cfg.calib)
    if cfg.search:  # §7: RTN-quantized candidates, the fitness on its own noise; the EA's rng is private (D4)
        t0 = time.time()
        fitness = fitness_fn(fp, cfg, kind, shape, vae, device)
        start = [cfg.group_size or max(space)] * len(names)
        genes, best, search_log = evolution(fitness, len(names), space, constraint(fp, cfg.budget, cfg.bitops), start,
                                            cfg, random.Random(cfg.seed))
        searched = dict(model=cfg.model, layers=names, group_sizes=genes, mean_g=sum(genes) / len(genes),
                        fitness=kind, value=best, space=space, budget=cfg.budget, bitops=cfg.bitops,
                        w_bits=cfg.w_bits, a_bits=cfg.a_bits, fit_n=cfg.fit_n, fit_steps=cfg.fit_steps, **search_log)
        with atomic_write(os.path.join(cfg.out, "searched_config.json"), "w") as f:
            json.dump(searched, f, indent=1)
        results["search"] = dict(seconds=time.time() - t0, fitness=kind, best=best, **search_log)
        print(f"search: {search_log['evaluated']} candidates, best {kind} {best:.4g}, mean g {searched['mean_g']:.1f} "
              f"-> {os.path.join(cfg.out, 'searched_config.json')}")

    # The ladder (spec §11.3): name -> (genes, activation quantizer, weights by, adaLN g)
    G, final = cfg.group_size, "gptq" if cfg.gptq else "rtn"
    tag, adaln = f"g{G}" if G else "row", G if cfg.quant_adaln else None
    if loaded is not None:
        rungs = {"loaded": (loaded["genes"], loaded["act"], None, loaded["adaln_g"])}
    elif cfg.load:
        rungs = {"searched": (searched["group_sizes"], "dynamic", final, adaln)}
    else:
        rungs = {"rtn": ([0] * len(names), "tensor", "rtn", 0 if cfg.quant_adaln else None),
                 f"{tag}_static": ([G] * len(names), "static", final, adaln),
                 f"{tag}_dynamic": ([G] * len(names), "dynamic", final, adaln)}
        if searched is not None:
            rungs["searched"] = (searched["group_sizes"], "dynamic", final, adaln)
    w_sym, a_sym, zero = ((loaded["w_sym"], loaded["a_sym"], loaded["include_zero"]) if loaded else
                          (cfg.w_sym, cfg.a_sym, cfg.include_zero))
    w_bits, a_bits = (loaded["w_bits"], loaded["a_bits"]) if loaded else (cfg.w_bits, cfg.a_bits)
    for name, (genes, act, weights, adaln_g) in rungs.items():
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        q = quantize(fp, genes, a_bits, a_sym, act, adaln_g, zero)
        if loaded is not None:
            for m in qlinears(q):  # room for the static ranges, then the saved tensors, strictly
                if m.quant_a and not m.aq.dynamic:
                    m.aq.lo = m.aq.hi = m.weight.new_zeros(m.weight.shape[1] // m.aq.g, 1)
            load_strict(q, {k: v.to(device) for k, v in st.items()}, cfg.load)
        else:
            if act != "dynamic":
                calibrate_static(q, calib, cfg.calib_batch)
            if weights == "gptq":
                gptq_model(q, calib, w_bits, w_sym, cfg.blocksize, cfg.damp, 32)   # GPTQ loader: batch 32 (§6)
            else:
                rtn_weights(q, w_bits, w_sym, zero)
        x = sample(q, noise, labels, seq, abar, cfg.cfg_scale, cfg.eval_batch, vae)
        results[name] = dict(eps_mse=eps_mse(guided(q), held["x"], held["t"], held["y"], eps_ref, cfg.eval_batch),
                             psnr=psnr_u8(x, fp_x), fid=fid_or_none(x, cfg.ref), seconds=time.time() - t0,
                             peak_mb=peak_mb(device), mean_g=sum(genes) / len(genes) if all(genes) else None,
                             act=act, weights=weights)
        save_grid(to_float(x[:64]), os.path.join(cfg.out, f"grid_{name}.png"))
        if loaded is None:
            meta = dict(model=cfg.model, genes=genes, act=act, weights=weights, adaln_g=adaln_g, w_bits=w_bits,
                        a_bits=a_bits, w_sym=w_sym, a_sym=a_sym, include_zero=zero)
            save_safetensors(q.state_dict(), os.path.join(cfg.out, f"{name}.safetensors"),
                             metadata=dict(qdit=json.dumps(meta)))
        print(f"{name}: {results[name]['seconds']:.0f} s")

    print(f"\n{'rung':14s} {'mean g':>7s} {'eps-MSE vs FP':>14s} {'PSNR vs FP':>11s} {'FID':>8s} {'seconds':>8s} "
          f"{'peak MB':>8s}")
    for name, r in results.items():
        if "eps_mse" in r:
            cells = [f"{r[k]:.{p}f}" if r[k] is not None else "-" for k, p in (("mean_g", 1), ("psnr", 2), ("fid", 2))]
            print(f"{name:14s} {cells[0]:>7s} {r['eps_mse']:14.5f} {cells[1]:>11s} {cells[2]:>8s} {r['seconds']:8.0f} "
                  f"{r['peak_mb']:8.0f}")
    write_record(os.path.join(cfg.out, "results.json"), asdict(cfg) | dict(fitness_used=kind), results,
                 time.time() - t_start, device)
    print(f"results -> {os.path.join(cfg.out, 'results.json')}")


if __name__ == "__main__":
    run_main(main)
