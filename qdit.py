"""
Q-DiT: accurate post-training quantization for diffusion transformers (Lei Chen, Yuan Meng, Chen Tang et
al., CVPR 2025, arXiv 2406.17343; official code github.com/Juanerx/Q-DiT @519d24a). W4A8 PTQ of a DiT:

- Group quantization: a Linear's weights and inputs in groups of g input channels, one (s, z) per group,
  one g for both (official qdit/quant.py); final weights by GPTQ (Frantar et al. 2023; qdit/gptq.py).
- Sample-wise dynamic activation quantization (paper section of that name): every token's groups get their
  (s, z) at every call, so per sample and per timestep; nothing is calibrated.
- Automatic granularity allocation: an evolutionary search over one g per Linear under a cost budget,
  fitness the FID of a small sample set (paper Algorithm 1; official scripts/evolution.py).

One run climbs the paper's ablation ladder on one calibration set and sampling noise: FP; naive RTN (per-row
weights, per-tensor static activations); fixed g, static; fixed g, dynamic; the searched g. Out: a table,
results.json, each rung's grid and state (with its settings, for --load), compare.png, searched_config.json.

    python qdit.py                                # bundled DiT, quick preset with a small search (2-core CPU)
    python qdit.py --no-search --group-size 32    # the fixed-g ladder only
    python qdit.py --model dit-xl-2-256 --search --ref VIRTUAL_imagenet256_labeled.npz   # the paper's (GPU)
    python qdit.py --load runs/qdit/searched_config.json   # FP and the searched rung again, no search
    python qdit.py --load runs/qdit/g64_static.safetensors --n 64   # a saved rung again, with 64 samples
    torchrun --nproc_per_node 8 qdit.py -- --model dit-xl-2-256 ...  # sampling and search shared by 8 GPUs

Expected result of `python qdit.py` (bundled DiT, W4A8, N = 256, 2-core CPU, ~350 s):
    rung           fp       rtn  g64_static  g64_dynamic  searched (mean g 64.0)
    ε-MSE           0   0.00351     0.00181      0.00073                 0.00074
    PSNR dB         –     28.30       37.59        38.61                   38.51
    FID        146.99    155.60      148.64       147.92                  147.26
Paper, DiT-XL/2 ImageNet 256 DDIM-100 W4A8: FID 6.40 (FP 5.31).

Where this differs from the paper or the official code:
- one gene sets a Linear's weight and activation g (the official search changed only the weights' g)
- searched g applied per layer everywhere, GPTQ too (quant_main.py indexes per block; GPTQ takes the first)
- elitist top-K merge every epoch and after the last (evolution.py calls an undefined update_top_k): --topk
- a private RNG for the EA, one fixed generator for all fitness noise (evolution.py reseeds): --fit-seed
- adaLN_modulation.1 weights quantized on both weight paths (official: GPTQ path only): --no-quant-adaln
- attention matmuls left FP (official --quantize_bmm_input crashes as shipped)
- min-max ranges as they are, z clamped, as official quant.py (0 not forced in): --include-zero
- the search scores RTN with symmetric W and A and no CFG, as evolution.sh: --search-final
- fp32 throughout, TF32 off in GPTQ (official quant_main.py: fp16 model under autocast): --amp bf16 samples
- cost budget mean g >= --budget (official evolution.py), not the paper's BitOps: --bitops
- GPTQ catches the block inputs once, then goes block by block (quant_main.py reruns the model per block)
- FID samples are drawn, 10k as quant_main.sh (its sample_fid call is commented out): --n
- without the Inception weights the fitness is the samples' MSE to FP's from the same noise: --fitness
"""
import copy, json, math, os, random, time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from common import (CACHE, CHECKPOINTS, QuantLinear, UserError, atomic_write, check_bits, ddim_sample,
                    ddim_timesteps, eps_mse, fake_quant, fid_or_none, held_out, linear_alphas_cumprod,
                    load_saved, load_strict, minmax_range, parse_config, peak_mb, predict,
                    print_table, psnr, qrange, quant_params, replace_modules, run_main, save_grid,
                    save_panels, save_safetensors, seed_everything, to_rows, world_rank, write_record)
from models import distributed, gather_rows, map_rows, sampling_mode
from models.dit import CONFIGS, eps_fn, load_dit
from models import vae as sd_vae

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# Configuration: the paper's settings (official quant_main.sh, evolution.sh), a preset for the bundled model

@dataclass
class Config:
    """Q-DiT (arXiv 2406.17343): FP, naive RTN, fixed-g static, fixed-g dynamic and searched g in one run."""
    model: str = "dit-cifar10-small"  # dit-cifar10-small (bundled, pixels), dit-xl-2-256 / -512 (paper)
    ckpt: str = ""                 # weights file for --model (default: the model's own checkpoint)
    vae: str = "sd-vae-ft-mse"     # decoder of dit-xl-2 latents, a name or a file (quant_main.py --vae mse)
    w_bits: int = 4                # weight bits (paper: W4A8, W6A8)
    a_bits: int = 8                # activation bits
    group_size: int = 128          # g of the fixed-g rungs and of the adaLN weights; 0: one group per row
    w_sym: bool = False            # symmetric final weights (quant_main.sh: asymmetric)
    a_sym: bool = False            # symmetric final activations (quant_main.sh: asymmetric)
    include_zero: bool = False     # widen every min-max range to hold 0 (official quant.py: no, z is clamped)
    gptq: bool = True              # final weights by GPTQ (quant_main.py --use_gptq); --no-gptq: RTN
    blocksize: int = 128           # GPTQ column block (official gptq.py)
    damp: float = 0.01             # GPTQ dampening, a fraction of mean diag(H) (quant_main.py --percdamp)
    quant_adaln: bool = True       # quantize adaLN_modulation.1 weights too (weights only, g = --group-size)
    steps: int = 100               # DDIM steps, DiT's even respacing, eta 0 (paper: 100 at 256 px, 50 at 512)
    cfg_scale: float = 1.5         # classifier-free guidance on output channels 0-2 (DiT forward_with_cfg)
    calib: int = 256               # calibration (x_t, t, y), one per FP trajectory (collect_cali_data.py)
    calib_batch: int = 16          # trajectories per calibration batch; their steps are distinct
    calib_steps: int = 50          # DDIM steps of the calibration trajectories (collect_cali_data.py)
    search: bool = False           # evolutionary search over one g per Linear (Algorithm 1): the last rung
    space: str = "32,64,128,192,288"  # the g a gene may take (evolution.sh)
    budget: int = 128              # constraint: mean g >= budget (official evolution.py)
    bitops: bool = False           # constraint on BitOps instead: sum of d_out*d_in/g <= uniform g = budget's
    population: int = 50           # EA population N_p (Algorithm 1; evolution.sh)
    topk: int = 10                 # elite K kept across epochs
    crossover: int = 25            # crossover children per epoch
    mutation: int = 25             # mutation children per epoch
    p_mut: float = 0.1             # per-gene mutation probability
    epochs: int = 10               # EA epochs
    fitness: str = "auto"          # fid (Inception, --ref), mse (distance to FP's samples), auto: fid if can
    fit_n: int = 800               # samples per fitness evaluation (evolution.sh: 800)
    fit_steps: int = 50            # DDIM steps of a fitness evaluation (evolution.sh: 50)
    fit_seed: int = 1234           # seed of the fitness noise and labels, the same for every candidate
    search_final: bool = False     # search with the final W/A symmetry and CFG (evolution.sh: sym., no CFG)
    n: int = 10000                 # samples per rung for FID / PSNR / the grid (quant_main.sh: 10k)
    eval_batch: int = 16           # images per sampling batch (quant_main.sh: 16; CFG doubles the forward)
    amp: str = "none"              # sampling under autocast: none (fp32) or bf16 (as DiT's sample.py)
    compile: bool = False          # torch.compile the network for sampling
    ref: str = ""                  # FID reference statistics .npz (ADM ref batch, eval_fid --save-stats)
    seed: int = 0                  # seed of calibration and the EA; seed + 1: sampling noise and labels
    device: str = "auto"           # auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)
    out: str = "runs/qdit"         # results.json, grids, quantized states, searched_config.json
    load: str = ""                 # searched_config.json (its g, no search) or a saved rung .safetensors


# Defaults follow the model: the paper's for DiT-XL/2; for the bundled DiT (Linears 128 and 512 wide: g = 128
# would be a whole row) g = 64 in the paper's shape (genes from a quarter of the budget to twice it), sized
# for a 2-core CPU (<= 10 min, search included). Flags given on the command line win.
PRESETS = {
    "dit-cifar10-small": dict(group_size=64, space="16,32,64,128", budget=64, steps=20, calib=128,
                              calib_steps=20, search=True, population=8, topk=3, crossover=4, mutation=4,
                              epochs=3, fit_n=32, fit_steps=10, n=256, eval_batch=64,
                              ref=os.path.join(HERE, "models", "cifar10_fragment_train_stats.npz")),
    "dit-xl-2-256": dict(steps=100),
    "dit-xl-2-512": dict(steps=50),
}
# What a saved rung's metadata and searched_config.json carry for --load: the model, quantizer and bench.
CARRIED = ("model ckpt vae w_bits a_bits group_size w_sym a_sym include_zero gptq blocksize damp quant_adaln "
           "steps cfg_scale calib calib_batch calib_steps n eval_batch ref seed").split()
LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's quantized Linears, evolution.py's order


def gene_layers(net):
    """Names of the searched Linears: gene 4·i + j is layer j of block i (official evolution.py's order)."""
    return [f"blocks.{i}.{name}" for i in range(len(net.blocks)) for name in LAYERS]


# -----------------------------------------------------------------------------
# Group-wise fake quantization along the input channel (official qdit/quant.py), weights by round-to-nearest

def qparams(lo, hi, bits, sym, include_zero):
    """(s, z) of Q-DiT's quantizer (official quant.py): the min-max range as it is (0 not forced in, z
    clamped to the grid) with the official floor 1e-5 on hi − lo (asymmetric) or on max|x| (symmetric)."""
    return quant_params(lo, hi, bits, sym, include_zero, eps=1e-5 if sym else 1e-5 / (2 ** bits - 1))


def rtn(W, bits, g, sym, include_zero=False):
    """W [d_out, d_in] rounded to nearest, one (s, z) per output row and group of g input channels."""
    rows = to_rows(W, "group", g or W.shape[1])                     # [d_out·d_in/g, g]
    s, z = qparams(*minmax_range(rows), bits, sym, include_zero)    # [d_out·d_in/g, 1] each
    return fake_quant(rows, s, z, *qrange(bits, sym)).reshape(W.shape)


def fake_quant_(x, s, z, qmin, qmax):
    """common.fake_quant's values, no straight-through estimator, in place: sampling's hot loop (~1.7x)."""
    return torch.div(x, s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


class ActQuant(nn.Module):
    """A Linear's input quantizer in groups of g input channels. Dynamic (the paper's sample-wise one): each
    token's groups' min-max (s, z) at each call (CFG's null half too). Static (the ablation, official
    --static): one (s, z) per channel group for all tokens, ranges from calibrate_static; g = d_in: tensor."""

    def __init__(self, bits, g, sym, dynamic, include_zero=False):
        super().__init__()
        self.bits, self.g, self.sym, self.dynamic, self.include_zero = bits, g, sym, dynamic, include_zero
        self.register_buffer("lo", None)                            # static: [d/g, 1] each
        self.register_buffer("hi", None)

    def groups(self, x):
        return to_rows(x, "group", self.g).reshape(-1, x.shape[-1] // self.g, self.g)   # [tokens, d/g, g]

    def forward(self, x):
        xg = self.groups(x)                                         # [tokens, d/g, g]
        if self.dynamic:
            lo, hi = xg.amin(2, keepdim=True), xg.amax(2, keepdim=True)             # [tokens, d/g, 1]
        else:
            lo, hi = self.lo, self.hi                                               # [d/g, 1], every token
        s, z = qparams(lo, hi, self.bits, self.sym, self.include_zero)
        return fake_quant_(xg, s, z, *qrange(self.bits, self.sym)).reshape(x.shape)


# -----------------------------------------------------------------------------
# Which layers (official qdit/modelutils.py): qkv, proj, fc1, fc2 (weights, inputs), adaLN (weights)

def quantize(fp, genes, a_bits, a_sym, act, *, adaln_g, include_zero=False):
    """A copy of fp with the Linears above wrapped (common.QuantLinear), weights FP. Block i's four get an
    input quantizer at their gene's g (act: dynamic, static, or tensor = static, one group), their weights g
    too (m.g); adaLN_modulation.1 adaln_g (None: FP). Attention matmuls, embeddings, the rest stay FP."""
    g_of = dict(zip(gene_layers(fp), genes))
    if adaln_g is not None:
        g_of |= {f"blocks.{i}.adaLN_modulation.1": adaln_g for i in range(len(fp.blocks))}

    def make(name, layer):
        d = layer.in_features
        g = g_of[name] or d                                             # 0: one group per row
        if d % g:
            raise UserError(f"group size {g} does not divide the {d} input channels of {name}")
        aq = None if name.endswith("adaLN_modulation.1") else ActQuant(
            a_bits, d if act == "tensor" else g, a_sym, act == "dynamic", include_zero)
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
    """Static ranges (official --static, qdit/outlier.py get_act_scales): input quantizers off, a hook per
    layer keeps a running min/max of its input per channel group, stat = 0.9·stat + 0.1·(this batch's)."""
    layers = [m for m in qlinears(q) if m.quant_a and not m.aq.dynamic]

    def observe(m, args):
        xg = m.aq.groups(args[0])                                   # [tokens, d/g, g]
        lo, hi = xg.amin((0, 2))[:, None], xg.amax((0, 2))[:, None]                   # [d/g, 1]
        first = m.aq.lo is None
        m.aq.lo, m.aq.hi = (lo, hi) if first else (0.9 * m.aq.lo + 0.1 * lo, 0.9 * m.aq.hi + 0.1 * hi)
    for m in layers:
        m.aq.lo, m.aq.hi, m.quant_a = None, None, False             # the layer sees its FP input meanwhile
    hooks = [m.register_forward_pre_hook(observe) for m in layers]
    for b in torch.arange(len(calib["x"])).split(batch):
        q(calib["x"][b], calib["t"][b], calib["y"][b])
    for m, h in zip(layers, hooks):
        h.remove()
        m.quant_a = True


# -----------------------------------------------------------------------------
# GPTQ with a group size per layer (official qdit/gptq.py GPTQ.fasterquant, each layer with its own g)

def gptq_params(w, bits, sym):
    """GPTQ's min-max quantizer (official gptq.py Quantizer_GPTQ), an (s, z) per row of w [d_out, g]: 0 always
    in range, [0, 0] -> [−1, 1]; symmetric: z = 2^(b−1), s = 2·max|w|/(2^b − 1); codes 0..2^b − 1."""
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)   # [d_out, 1]
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)
    both0 = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both0, -1.0, lo), torch.where(both0, 1.0, hi)
    s = (hi - lo) / (2 ** bits - 1)
    return s, torch.full_like(s, 2 ** (bits - 1)) if sym else torch.round(-lo / s)


@torch.no_grad()
def gptq(W, H, bits, g, sym, *, blocksize=128, damp=0.01):
    """GPTQ (Frantar et al. 2023, Algorithm 1; official gptq.py without act-order) with one (s, z) per row
    and group of g input columns. Goal: a grid-valued Q with a small ||W X − Q X||², H = 2 X Xᵀ.
    Columns are rounded left to right; rounding column k leaves the error w_k − q_k, and the optimal change of
    the columns not yet rounded (OBS) is W[:, k:] −= (w_k − q_k)/[H_k⁻¹]_kk·[H_k⁻¹]_k,k: (H_k⁻¹: the inverse
    Hessian of the columns ≥ k). Row k of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) is that row of
    H_k⁻¹ over √[H_k⁻¹]_kk, so W[:, k:] −= e·U_k,k: with e = (w_k − q_k)/U_kk: one factorisation for all k."""
    W, H = W.detach().clone().float(), H.clone()                    # [d_out, d_in], [d_in, d_in]
    d_in, g = W.shape[1], g or W.shape[1]
    dead = torch.diag(H) == 0                                       # inputs that are always 0: their weights
    H[dead, dead] = 1                                               # never matter; set them to 0
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())                  # + λI, λ = damp·mean diag H: stable
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)   # [d_in, d_in]
    Q = torch.zeros_like(W)
    for i1 in range(0, d_in, blocksize):  # lazy batch updates: a block column by column, later blocks at once
        i2 = min(i1 + blocksize, d_in)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])   # [d_out, block]: working copy, errors
        for k in range(i2 - i1):
            c = i1 + k
            if c % g == 0:  # a new group: its (s, z) from W, with the earlier blocks' updates but not this
                s, z = gptq_params(W[:, c:c + g], bits, sym)         # block's (in W1): as official gptq.py
            q = fake_quant(W1[:, k:k + 1], s, z, 0, 2 ** bits - 1)  # [d_out, 1], on the group's grid
            Q[:, c] = q[:, 0]
            e = (W1[:, k] - q[:, 0]) / U[c, c]                       # [d_out]
            W1[:, k:] -= e[:, None] * U[c, c:i2][None]              # the block's later columns absorb it
            E1[:, k] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]                              # ... and all later blocks, in one matmul
    return Q


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


@torch.no_grad()
def gptq_model(q, calib, bits, sym, *, blocksize, damp, batch):
    """GPTQ over the model in the GPTQ repository's driver shape (opt_sequential): catch block 0's inputs,
    then block by block: hooks gather H = 2/n Σ x xᵀ of every wrapped Linear's input as the quantized model
    sees it (activation quantizers on, earlier blocks quantized), GPTQ each with its own g, and the block's
    quantized outputs are the next block's inputs. Conditional forwards (calibration has no null class).
    TF32 is off meanwhile (GPTQ's maths in fp32) and back as it was after."""
    xs, tf32 = [], (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

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
            Q = gptq(m.weight, 2 * H[m] / n[m], bits, m.g, sym, blocksize=blocksize, damp=damp)
            m.weight.data = Q.to(m.weight.dtype)
        xs = [(block(x, c), c) for x, c in xs]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# -----------------------------------------------------------------------------
# Calibration (official collect_cali_data.py) and sampling: DDIM η = 0, CFG on channels 0-2 (DiT)

@torch.no_grad()
def calibration_set(fp, n, batch, seq, abar, *, cfg_scale, shape, generator, device):
    """Official collect_cali_data.py: FP DDIM + CFG trajectories, `batch` at a time, per batch distinct steps
    drawn: one (x_t, t, y) per trajectory, x_t the conditional half. Shared out under torchrun (map_rows)."""
    draws = [(torch.randn(batch, *shape, generator=generator), torch.randint(fp.num_classes, (batch,),
              generator=generator), torch.randperm(len(seq), generator=generator)[:batch]) for _ in
             range(-(-n // batch))]
    z, y, step = (torch.cat(v) for v in zip(*draws))                # step k: the k-th, noisiest first

    def run(r):
        _, traj = ddim_sample(eps_fn(fp, y[r].to(device), cfg_scale), z[r].to(device), seq, abar,
                              trajectory=True)
        return torch.stack([traj[k][0][j] for j, k in enumerate(step[r].tolist())])
    x = map_rows(run, len(z), batch, desc="calibration")
    t = torch.tensor([float(seq[len(seq) - 1 - k]) for k in step.tolist()])
    return {k: v[:n].to(device) for k, v in dict(x=x, t=t, y=y).items()}


def to_float(u8):  # uint8 [N, H, W, 3] -> [N, 3, H, W] in ±1
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def sample(net, noise, labels, seq, abar, *, cfg_scale, batch, vae=None, shard=True):
    """DDIM from the given noise and labels, through the VAE for latent models, as uint8 [N, H, W, 3]: what
    FID reads, and 10k images at 256 px fit in memory only as bytes. Shared out under torchrun (map_rows)."""
    def run(r):
        x = ddim_sample(eps_fn(net, labels[r], cfg_scale), noise[r], seq, abar)
        x = vae.decode(x) if vae is not None else x                 # [B, 3, H, W], about [−1, 1]
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return map_rows(run, len(noise), batch, shard=shard, progress=shard)


def psnr_u8(x, ref, chunk=500):
    return sum(psnr(to_float(x[i:i + chunk]), to_float(ref[i:i + chunk])) * len(x[i:i + chunk])
               for i in range(0, len(x), chunk)) / len(x)


# -----------------------------------------------------------------------------
# Automatic granularity allocation (paper Algorithm 1, official scripts/evolution.py): one g per Linear

def evolution(fitness, n_genes, space, legal, start, *, cfg, rng):
    """Paper Algorithm 1 (official evolution.py): minimise fitness over g vectors under `legal`. Population:
    `start` (official: [128]·112) and random legal vectors; each epoch merges it into the elite (the best K
    seen), breeds `mutation` children (a random elite parent, each gene redrawn with probability p_mut) and
    `crossover` children (each gene from either of two parents, 1/2 each), at most 10 tries per child, and
    refills at random; one more merge ends it. Legal candidates are scored once, those proposed in one go
    together: under torchrun process r scores the r-th, (r + W)-th, ... (models.gather_rows shares them)."""
    seen, pop, history = {}, [], []

    def consider(cand):
        cand = tuple(cand)
        if cand not in seen and legal(cand):
            seen[cand] = None                                       # scored by score_new
            pop.append(cand)

    def score_new():
        new, (world, rank) = [c for c in pop if seen[c] is None], world_rank()
        mine = torch.tensor([fitness(c) for c in new[rank::world]], dtype=torch.float64)
        seen.update(zip(new, (gather_rows(mine, len(new), world) if world > 1 and new else mine).tolist()))

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
    score_new()
    elite = []
    for epoch in tqdm(range(cfg.epochs), desc="search", leave=False):
        elite = sorted(set(elite) | set(pop), key=lambda c: (seen[c], c))[:cfg.topk]
        pop.clear()
        breed(lambda: [rng.choice(space) if rng.random() < cfg.p_mut else v for v in rng.choice(elite)],
              cfg.mutation)
        breed(lambda: [a if rng.random() < 0.5 else b for a, b in zip(rng.choice(elite), rng.choice(elite))],
              cfg.crossover)
        refill()
        score_new()
        history.append(dict(epoch=epoch, best=seen[elite[0]], evaluated=len(seen)))
    elite = sorted(set(elite) | set(pop), key=lambda c: (seen[c], c))[:cfg.topk]
    return list(elite[0]), seen[elite[0]], dict(evaluated=len(seen), history=history,
                                                elite=[dict(genes=list(c), fitness=seen[c]) for c in elite])


def constraint(fp, budget, bitops):
    """Legal iff mean g >= budget (official evolution.py), or with bitops iff the g-dependent part of the
    BitOps (the paper's budget), Σ_l d_out·d_in/g_l (a rescale per output and group), is <= uniform g's."""
    mods = dict(fp.named_modules())
    cost = [mods[name].in_features * mods[name].out_features for name in gene_layers(fp)]
    if bitops:
        return lambda c: sum(w / g for w, g in zip(cost, c)) <= sum(cost) / budget * (1 + 1e-9)
    return lambda c: sum(c) >= budget * len(c)


def fid_few(f, mu_r, sigma_r):
    """FID of n samples' Inception features f [n, 2048] against (μ_r, Σ_r), exactly, without the 2048²
    matrix square root (seconds on a CPU): Σ_g = A Aᵀ with A = (f − μ_g)ᵀ/√(n − 1), and Σ_r Σ_g
    has the nonzero eigenvalues of the n×n PSD Aᵀ Σ_r A, so Tr (Σ_r Σ_g)^½ = Σ √λ. float64."""
    mu = f.mean(0)
    A = (f - mu).T / math.sqrt(len(f) - 1)                         # [2048, n]
    lam = torch.linalg.eigvalsh(A.T @ sigma_r @ A).clamp(min=0)    # [n]
    return ((mu - mu_r).pow(2).sum() + sigma_r.trace() + A.pow(2).sum() - 2 * lam.sqrt().sum()).item()


def fitness_fn(fp, cfg, kind, shape, vae, *, device):
    """The loss of a g vector (official evolution.py, evolution.sh): FP model, dynamic input quantizers at the
    candidate's g, RTN weights (never GPTQ), symmetric, no CFG unless --search-final; adaLN at --group-size;
    one noise and label set for all. kind fid: FID of the samples against --ref (eval_fid's Inception); mse:
    their mean squared distance to FP's samples. Under torchrun each process scores its own candidates."""
    w_sym, a_sym, scale = (cfg.w_sym, cfg.a_sym, cfg.cfg_scale) if cfg.search_final else (True, True, 1.0)
    g = torch.Generator().manual_seed(cfg.fit_seed)
    noise = torch.randn(cfg.fit_n, *shape, generator=g).to(device)
    labels = torch.randint(fp.num_classes, (cfg.fit_n,), generator=g).to(device)
    seq, abar, names = ddim_timesteps("even", cfg.fit_steps), linear_alphas_cumprod(), gene_layers(fp)
    q = quantize(fp, [cfg.group_size] * len(names), cfg.a_bits, a_sym, "dynamic",
                 adaln_g=cfg.group_size if cfg.quant_adaln else None, include_zero=cfg.include_zero)
    mods = dict(q.named_modules())
    w_fp = {name: mods[name].weight.detach().clone() for name in names}
    rtn_weights(q, cfg.w_bits, w_sym, cfg.include_zero)             # adaLN at --group-size, fixed
    run = lambda net: sample(net, noise, labels, seq, abar, cfg_scale=scale,  # noqa: E731
                             batch=cfg.eval_batch, vae=vae, shard=False)
    if kind == "fid":
        import eval_fid
        inception = eval_fid.load_inception().to(device, memory_format=torch.channels_last)   # as eval_fid
        ref = eval_fid.read_input(cfg.ref)
        ref = ref if isinstance(ref, tuple) else eval_fid.statistics(ref, inception, 50, device)[:2]
        mu_r, sigma_r = (torch.as_tensor(v, dtype=torch.float64, device=device) for v in ref)

        def score(x):  # uint8 [n, H, W, 3] -> [0, 1], resized to 299 in the Inception (eval_fid's contract)
            f = torch.cat([inception(xb.to(device).permute(0, 3, 1, 2).float() / 255) for xb in x.split(50)])
            return fid_few(f.double(), mu_r, sigma_r)
    else:
        x_fp = to_float(run(fp))
        score = lambda x: (to_float(x) - x_fp).pow(2).mean().item()  # noqa: E731

    @torch.no_grad()
    def fitness(genes):
        for name, gene in zip(names, genes):
            m = mods[name]
            m.g = m.aq.g = gene                                         # weights and activations
            m.weight.data = rtn(w_fp[name], cfg.w_bits, gene, w_sym, cfg.include_zero)
        return score(run(q))
    return fitness


# -----------------------------------------------------------------------------
# The ladder: flag checks, --load, the rungs, one rung's build and measurement, main

def check_config(cfg):
    """The flag checks that need no model; returns the sorted gene space."""
    check_bits(w_bits=cfg.w_bits, a_bits=cfg.a_bits)
    try:
        space = sorted({int(v) for v in cfg.space.split(",")})
    except ValueError:
        raise UserError(f"--space {cfg.space!r}: comma-separated group sizes, e.g. 32,64,128") from None
    if min(space) <= 0 or cfg.group_size < 0 or cfg.budget <= 0 or max(space) < cfg.budget:
        raise UserError(f"need group sizes > 0, --group-size >= 0, 0 < --budget {cfg.budget} <= max(--space)")
    if not 2 <= cfg.steps <= 1000 or not 2 <= cfg.calib_steps <= 1000 or not 2 <= cfg.fit_steps <= 1000:
        raise UserError("--steps, --calib-steps and --fit-steps must lie in 2..1000")
    if not 1 <= cfg.calib_batch <= cfg.calib_steps or cfg.calib < 1 or cfg.n < 1 or cfg.fit_n < 2:
        raise UserError("need 1 <= --calib-batch <= --calib-steps (distinct steps per batch), --calib >= 1, "
                        "--n >= 1, --fit-n >= 2")
    if (min(cfg.population, cfg.topk, cfg.epochs) < 1 or min(cfg.crossover, cfg.mutation) < 0
            or not 0 <= cfg.p_mut <= 1):
        raise UserError("need --population, --topk, --epochs >= 1, --crossover, --mutation >= 0, "
                        "0 <= --p-mut <= 1")
    if cfg.fitness not in ("auto", "fid", "mse") or cfg.amp not in ("none", "bf16"):
        raise UserError(f"--fitness {cfg.fitness!r} / --amp {cfg.amp!r}: choose auto, fid, mse / none, bf16")
    return space


def read_load(cfg):
    """--load: (config, searched, loaded, state) of searched_config.json (its g, no search) or a rung's file;
    the config parsed again with the file's CARRIED settings under the flags given (quantizer flags fixed)."""
    if not cfg.load:
        return cfg, None, None, None
    searched = loaded = st = None
    if cfg.load.endswith(".json"):
        if not os.path.isfile(cfg.load):
            raise UserError(f"{cfg.load}: no such file")
        with open(cfg.load) as f:
            searched = json.load(f)
        if not isinstance(searched, dict) or "group_sizes" not in searched:
            raise UserError(f"{cfg.load}: not a configuration written by qdit.py (no group_sizes)")
    else:
        st, loaded = load_saved(cfg.load, "qdit")   # its rung and settings are in the file's metadata
    cfg = parse_config(Config, PRESETS, saved={k: v for k, v in (searched or loaded).items() if k in CARRIED})
    for k in ("w_bits", "a_bits", "w_sym", "a_sym", "include_zero") if loaded else ():   # fixed by the state
        if k in loaded and getattr(cfg, k) != loaded[k]:
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: {cfg.load} was quantized with "
                            f"{loaded[k]}; drop the flag")
    cfg.search = False
    return cfg, searched, loaded, st


def load_models(cfg, device, space, searched):
    """The FP DiT, the SD VAE for a latent model (--vae: a name of models/vae.py or a weights file), the
    checks that need the model, the fitness: FID with a cached Inception and --ref, else MSE to FP's."""
    fp = load_dit(cfg.model, cfg.ckpt or None).to(device).requires_grad_(False)
    vae = None
    if fp.in_channels == 4:
        vae = sd_vae.load_vae(*(cfg.vae, None) if cfg.vae in sd_vae.CONFIGS else ("sd-vae-ft-mse", cfg.vae))
        vae = vae.to(device).requires_grad_(False)
    names, mods = gene_layers(fp), dict(fp.named_modules())
    widths = sorted({mods[name].in_features for name in names})
    for g in (space if cfg.search else []) + [cfg.group_size]:
        if g and any(w % g for w in widths):
            raise UserError(f"group size {g} does not divide the Linear input widths {widths} of {cfg.model}")
    if searched is not None and (searched.get("layers") != names or any(g <= 0 or w % g for w, g in zip(
            [mods[name].in_features for name in names], searched["group_sizes"]))):
        raise UserError(f"{cfg.load}: its layers or group sizes do not fit {cfg.model}")
    kind = cfg.fitness if cfg.fitness != "auto" else "fid" if cfg.ref and any(os.path.isfile(os.path.join(
        CACHE, CHECKPOINTS[k][2])) for k in ("inception-torchscript", "inception-pytorch-fid")) else "mse"
    if kind == "fid" and not cfg.ref:
        raise UserError("--fitness fid needs --ref (FID reference statistics)")
    return fp, vae, names, kind


def guided(net, cfg_scale):  # the CFG-guided ε DDIM uses, of a data dict (x, t, y): for predict / eps_mse
    return lambda d: eps_fn(net, d["y"], cfg_scale)(d["x"], d["t"])


def fp_reference(fp, vae, cfg, g, device):
    """The bench every rung is measured on: sampling noise and labels (seed + 1), FP's samples, 512 held-out
    ε-MSE points from FP's own trajectories (randperm on g) and FP's ε there. Returns it and FP's row."""
    t0 = time.time()
    size, gen_n = CONFIGS[cfg.model]["input_size"], torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn(cfg.n, fp.in_channels, size, size, generator=gen_n).to(device)
    labels = torch.randint(fp.num_classes, (cfg.n,), generator=gen_n).to(device)
    seq, abar = ddim_timesteps("even", cfg.steps), linear_alphas_cumprod()
    bench = dict(noise=noise, labels=labels, seq=seq, abar=abar, vae=vae)
    with sampling_mode(fp, amp=cfg.amp, compile=cfg.compile):
        bench["fp_x"] = sample(fp, noise, labels, seq, abar, cfg_scale=cfg.cfg_scale, batch=cfg.eval_batch,
                               vae=vae)
    h = min(32, cfg.n)
    eps_fp = eps_fn(fp, labels[:h], cfg.cfg_scale)
    bench["held"] = held_out(eps_fp, noise[:h], seq, abar, g, labels=labels[:h])
    bench["eps_ref"] = predict(guided(fp, cfg.cfg_scale), bench["held"], cfg.eval_batch)
    return bench, dict(eps_mse=0.0, psnr=None, fid=fid_or_none(bench["fp_x"], cfg.ref, device),
                       seconds=time.time() - t0, peak_mb=peak_mb(device), mean_g=None)


def run_search(fp, cfg, kind, space, bench):
    """The search: writes searched_config.json; returns the configuration and the search's result row."""
    t0 = time.time()
    names = gene_layers(fp)
    fitness = fitness_fn(fp, cfg, kind, bench["noise"].shape[1:], bench["vae"], device=bench["noise"].device)
    start = [cfg.group_size or max(space)] * len(names)
    genes, best, log = evolution(fitness, len(names), space, constraint(fp, cfg.budget, cfg.bitops), start,
                                 cfg=cfg, rng=random.Random(cfg.seed))
    searched = {k: getattr(cfg, k) for k in CARRIED} | dict(
        layers=names, group_sizes=genes, mean_g=sum(genes) / len(genes), fitness=kind, value=best,
        space=space, budget=cfg.budget, bitops=cfg.bitops, fit_n=cfg.fit_n, fit_steps=cfg.fit_steps, **log)
    path = os.path.join(cfg.out, "searched_config.json")
    with atomic_write(path, "w") as f:
        json.dump(searched, f, indent=1)
    print(f"search: {log['evaluated']} candidates, best {kind} {best:.4g}, "
          f"mean g {searched['mean_g']:.1f} -> {path}")
    return searched, dict(seconds=time.time() - t0, fitness=kind, best=best, **log)


def ladder(cfg, n_genes, searched, loaded):
    """The rungs in the paper's ablation order: name -> dict(genes: one g per searched Linear (0: a row),
    act: dynamic / static / tensor (static, one group), weights: gptq / rtn (None: as saved), adaln_g)."""
    G, final = cfg.group_size, "gptq" if cfg.gptq else "rtn"
    tag = f"g{G}" if G else "row"
    adaln = G if cfg.quant_adaln else None
    if loaded is not None:
        return {"loaded": dict(genes=loaded["genes"], act=loaded["act"], weights=None,
                               adaln_g=loaded["adaln_g"])}
    rungs = {}
    if not cfg.load:
        rungs["rtn"] = dict(genes=[0] * n_genes, act="tensor", weights="rtn",
                            adaln_g=0 if cfg.quant_adaln else None)
        rungs[f"{tag}_static"] = dict(genes=[G] * n_genes, act="static", weights=final, adaln_g=adaln)
        rungs[f"{tag}_dynamic"] = dict(genes=[G] * n_genes, act="dynamic", weights=final, adaln_g=adaln)
    if searched is not None:
        rungs["searched"] = dict(genes=searched["group_sizes"], act="dynamic", weights=final, adaln_g=adaln)
    return rungs


def build_rung(fp, rung, cfg, calib, *, st):
    """One rung's model: wrap, calibrate static ranges, quantize the weights (GPTQ loader: batch 32, as
    quant_main.py); with st (--load), room for the static ranges, then the saved tensors, strictly."""
    q = quantize(fp, rung["genes"], cfg.a_bits, cfg.a_sym, rung["act"], adaln_g=rung["adaln_g"],
                 include_zero=cfg.include_zero)
    if st is not None:
        for m in qlinears(q):
            if m.quant_a and not m.aq.dynamic:
                m.aq.lo = m.weight.new_zeros(m.weight.shape[1] // m.aq.g, 1)
                m.aq.hi = torch.zeros_like(m.aq.lo)                 # its own tensor, else hi loads over lo
        return load_strict(q, {k: v.to(next(fp.parameters()).device) for k, v in st.items()}, cfg.load)
    if rung["act"] != "dynamic":
        calibrate_static(q, calib, cfg.calib_batch)
    if rung["weights"] == "gptq":
        gptq_model(q, calib, cfg.w_bits, cfg.w_sym, blocksize=cfg.blocksize, damp=cfg.damp, batch=32)
    else:
        rtn_weights(q, cfg.w_bits, cfg.w_sym, cfg.include_zero)
    return q


def measure(q, rung, cfg, bench, t0):
    """q's result row (ε-MSE on the held-out points, PSNR and FID vs FP) and samples (uint8 [N, H, W, 3])."""
    with sampling_mode(q, amp=cfg.amp, compile=cfg.compile):
        x = sample(q, bench["noise"], bench["labels"], bench["seq"], bench["abar"], cfg_scale=cfg.cfg_scale,
                   batch=cfg.eval_batch, vae=bench["vae"])
    genes, device = rung["genes"], bench["noise"].device
    row = dict(eps_mse=eps_mse(guided(q, cfg.cfg_scale), bench["held"], bench["eps_ref"], cfg.eval_batch),
               psnr=psnr_u8(x, bench["fp_x"]), fid=fid_or_none(x, cfg.ref, device), seconds=time.time() - t0,
               peak_mb=peak_mb(device), mean_g=sum(genes) / len(genes) if all(genes) else None,
               act=rung["act"], weights=rung["weights"])
    return row, x


def main():
    cfg, searched, loaded, st = read_load(parse_config(Config, PRESETS))
    space = check_config(cfg)
    seed_everything(cfg.seed)
    device, t_start = distributed(cfg.device)[2], time.time()      # torchrun: sampling and search shared
    fp, vae, names, kind = load_models(cfg, device, space, searched)
    os.makedirs(cfg.out, exist_ok=True)
    print(f"{cfg.model}, W{cfg.w_bits}A{cfg.a_bits}, g {cfg.group_size}, DDIM-{cfg.steps} (even), "
          f"CFG {cfg.cfg_scale}, {cfg.calib} calibration samples, GPTQ {cfg.gptq}, N = {cfg.n}, {device}")

    g = torch.Generator().manual_seed(cfg.seed)                     # held-out points, then calibration
    bench, fp_row = fp_reference(fp, vae, cfg, g, device)
    results = {"fp": fp_row}
    samples = {"FP": bench["fp_x"][:32]}
    save_grid(to_float(bench["fp_x"][:64]), os.path.join(cfg.out, "grid_fp.png"))
    calib = None
    if loaded is None:
        t0 = time.time()
        calib = calibration_set(fp, cfg.calib, cfg.calib_batch, ddim_timesteps("even", cfg.calib_steps),
                                bench["abar"], cfg_scale=cfg.cfg_scale, shape=bench["noise"].shape[1:],
                                generator=g, device=device)
        results["calibration"] = dict(seconds=time.time() - t0, n=cfg.calib)
    if cfg.search:
        searched, results["search"] = run_search(fp, cfg, kind, space, bench)

    rungs = ladder(cfg, len(names), searched, loaded)
    for name, rung in rungs.items():
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        q = build_rung(fp, rung, cfg, calib, st=st)
        results[name], x = measure(q, rung, cfg, bench, t0)
        samples[name] = x[:32]
        save_grid(to_float(x[:64]), os.path.join(cfg.out, f"grid_{name}.png"))
        if loaded is None:
            save_safetensors(q.state_dict(), os.path.join(cfg.out, f"{name}.safetensors"),
                             metadata=dict(qdit=json.dumps({k: getattr(cfg, k) for k in CARRIED} | rung)))
        print(f"{name}: {results[name]['seconds']:.0f} s")

    print_table(results, label="rung")
    if not cfg.load:  # FP, the naive baseline and Q-DiT (the searched rung, else fixed g dynamic), same noise
        wa, dyn = f"W{cfg.w_bits}A{cfg.a_bits}", [n for n, r in rungs.items() if r["act"] == "dynamic"]
        panels = {"FP": samples["FP"], f"RTN {wa}": samples["rtn"], f"Q-DiT {wa}": samples[dyn[-1]]}
        save_panels({k: to_float(v) for k, v in panels.items()}, os.path.join(cfg.out, "compare.png"))
    run = asdict(cfg) | dict(sampler="DDIM, even timesteps (DiT space_timesteps)", fitness_used=kind)
    write_record(os.path.join(cfg.out, "results.json"), run, results, time.time() - t_start, device)


if __name__ == "__main__":
    run_main(main)
