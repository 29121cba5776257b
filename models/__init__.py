"""
The UNet diffusion models that dilatequant.py and edadm.py quantize, behind one interface: the pixel-space
DDPM UNets of models/ddpm.py and the latent diffusion models of models/ldm.py.

    d = load_model("ldm-lsun-church", "model.ckpt")          # or "ddpm-cifar10-small", "ddpm-cifar10", ...
    z = d.sample(d.eps(d.net), noise, d.timesteps(20), eta=0.0)
    images = d.decode(z)

A `Diffusion` holds the ε network (cin256-v2: the UNet with its class embedder, ε(x, t, y)), the shape of
x_T, ᾱ, the sampler's conventions and the decoder from the sampler's output to images in [−1, 1].
"""
import atexit, contextlib, os
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from common import (UserError, atomic_write, ddim_sample, ddim_timesteps, held_out, linear_alphas_cumprod,
                    pick_device, save_grid, world_rank)


class Diffusion(NamedTuple):
    net: nn.Module                  # ε(x, t), or ε(x, t, y) when class-conditional
    shape: tuple                    # [C, H, W] of x_T: pixels (DDPM) or latents (LDM)
    alphas_cumprod: torch.Tensor    # [1000]
    latent: bool                    # LDM conventions: timesteps 1, 1 + T/S, …; ᾱ_0 below the first step
    decode: nn.Module               # the sampler's output -> images in [−1, 1] (identity for pixels)
    classes: int                    # 0: unconditional; n: labels 0..n−1, label n is "no class" (CFG)
    feature: str                    # the middle block's attention: its input is EDA-DM's TDAC feature

    def timesteps(self, steps):
        """DDPM: the DDIM code's "quad" sequence (EDA-DM's and DilateQuant's CIFAR-10 setting);
        LDM: uniform + 1 (CompVis ldm/models/diffusion/ddim.py, ddim_discretize "uniform")."""
        return ddim_timesteps("ldm" if self.latent else "quad", steps)

    @property
    def sampler(self):  # for the run's protocol record
        return "DDIM, timesteps 1 + k·T/S (CompVis DDIMSampler)" if self.latent else "DDIM, quad timesteps"

    @property
    def final_abar(self):
        """ᾱ below the first step: 1 (the DDIM code), ᾱ_0 for an LDM (its DDIMSampler's alphas_prev[0])."""
        return self.alphas_cumprod[0].item() if self.latent else 1.0

    def sample(self, eps_fn, x, seq, **kw):
        return ddim_sample(eps_fn, x, seq, self.alphas_cumprod, final_abar=self.final_abar, **kw)

    @torch.no_grad()
    def images(self, net, noise, seq, *, labels=None, eta=0.0, cfg_scale=1.0, batch=64, before_step=None,
               seed=None):
        """Decoded DDIM samples of `net` from `noise` (labels: their classes or None), `batch` at a time
        (map_rows: shared out under torchrun); the η > 0 noise of row i from image_generators(seed, [i])
        (seed None: the global RNG)."""
        def run(r):
            g = None if eta == 0 or seed is None else image_generators(seed, r.tolist())
            z = self.sample(self.eps(net, None if labels is None else labels[r], cfg_scale), noise[r], seq,
                            eta=eta, before_step=before_step, generator=g)
            return self.decode(z).float().cpu()
        return map_rows(run, len(noise), batch)

    @torch.no_grad()
    def trajectories(self, net, noise, seq, *, labels=None, eta=0.0, cfg_scale=1.0, batch=64, seed=0,
                     feature=None):
        """DDIM trajectories of `net` from `noise`, `batch` at a time (map_rows: shared out under torchrun):
        every step's input x_t, [N, S, C, H, W] in sampling order (the noisiest first), and with `feature` (a
        module name) that module's input at every step, [N, S, ...] (guided: [N, S, 2, ...], unconditional
        first). The η > 0 noise of trajectory i comes from image_generators(seed, [i])."""
        module = dict(net.named_modules())[feature] if feature else None

        def run(r):
            seen, g = [], image_generators(seed, r.tolist()) if eta else None
            hook = module and module.register_forward_hook(lambda m, a, out: seen.append(a[0].cpu()))
            try:
                eps = self.eps(net, None if labels is None else labels[r], cfg_scale)
                _, traj = self.sample(eps, noise[r], seq, eta=eta, trajectory=True, generator=g)
            finally:
                if hook:
                    hook.remove()
            xs = torch.stack([x for x, _, _ in traj], 1)
            if not module:
                return xs
            f = torch.stack(seen, 1)                                    # [b or 2b (uncond; cond), S, ...]
            return xs, f if len(f) == len(r) else f.unflatten(0, (2, -1)).transpose(0, 1).transpose(1, 2)
        return map_rows(run, len(noise), batch, desc="FP trajectories")

    def points(self, net, noise, seq, generator, *, labels=None, eta=0.0, cfg_scale=1.0, n=512):
        """common.held_out on this model's sampler: n random inputs (x, t, idx[, y]) of net's trajectories."""
        return held_out(self.eps(net, labels, cfg_scale), noise, seq, self.alphas_cumprod, generator, n=n,
                        labels=labels, eta=eta, final_abar=self.final_abar)

    def labels(self, n, generator=None):
        """Class labels of n samples, or None: in order, n/1000 per class (EDA-DM's 50 per class at 50k);
        with a generator, at random (calibration)."""
        if not self.classes:
            return None
        return torch.randint(self.classes, (n,), generator=generator) if generator else torch.arange(n) % \
            self.classes

    def eps(self, net, y=None, cfg_scale=1.0):
        """ε(x, t) for the sampler: net itself, or with labels y; classifier-free guidance for s ≠ 1 as the
        official DDIMSampler: ε_u + s (ε_c − ε_u) from one batch [uncond; cond]."""
        if y is None:
            return net
        if cfg_scale == 1.0:
            return lambda x, t: net(x, t, y.to(x.device))

        def guided(x, t):
            y2 = torch.cat([torch.full_like(y, self.classes), y]).to(x.device)
            e_u, e_c = net(torch.cat([x, x]), torch.cat([t, t]), y2).chunk(2)
            return e_u + cfg_scale * (e_c - e_u)
        return guided

    def with_uncond(self, data, cfg_scale):
        """Data points (dict x, t, idx, y) and, under guidance, their unconditional copies: the network sees
        both halves of every guided batch."""
        if "y" not in data or cfg_scale == 1.0:
            return data
        null = torch.full_like(data["y"], self.classes)
        return {k: torch.cat([v, null if k == "y" else v]) for k, v in data.items()}

    def example(self, device):
        """Inputs of one forward (zeros), e.g. to trace the order of layers or blocks."""
        x, t = torch.zeros(1, *self.shape, device=device), torch.zeros(1, device=device)
        return (x, t) + ((torch.zeros(1, dtype=torch.long, device=device),) if self.classes else ())


@torch.no_grad()
def first_last_layers(model, x, *args):
    """The first and last layers by data flow in one forward model(x, *args): the first Conv/Linear fed x
    itself and the last to run (DDPM UNet: conv_in, conv_out; registration order puts temb.dense.0 first)."""
    order, readers = [], []                             # the layers that ran, and those fed x itself

    def record(name, inp):
        order.append(name)
        readers.extend([name] if inp is x else [])
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: record(n, a[0])) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    try:
        model(x, *args)
    finally:
        for h in hooks:
            h.remove()
    return readers[0], order[-1]


@torch.no_grad()
def in_order(model, example, blocks, layers):
    """Names of the modules of types `blocks`, and of types `layers` outside them, in the order one forward
    on the inputs `example` runs them (not registration order: DDPM's up path runs in reverse index order)."""
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, blocks)]
    units += [(n, m) for n, m in model.named_modules()
              if isinstance(m, layers) and not any(n.startswith(u + ".") for u, _ in units)]
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n, m in units]
    try:
        model(*example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


# -----------------------------------------------------------------------------
# Sampling many images over many processes (torchrun), the same images for any number of them

def distributed(device="auto"):
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE set) the process group starts
    (NCCL on CUDA, else gloo) and rank r takes cuda:LOCAL_RANK; a plain run is (0, 1, the device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, pick_device(device)
    cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)  # ends with us
    return dist.get_rank(), world, pick_device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")


def image_generators(seed, indices):
    """A CPU generator per image i, seeded by (seed, i) through numpy's SeedSequence: image i's x_T and its
    DDIM noise depend on nothing else (not the batch, not the process that samples it)."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            for i in indices]


@torch.no_grad()
def sample_sharded(sample_fn, n, shape, *, seed, batch):
    """Images 0..n−1 as uint8 [n, H, W, 3] on rank 0 (None on the others), shared out by map_rows, every call
    holding exactly min(batch, n) images whatever the number of processes (the last padded: a kernel may round
    differently at another size). sample_fn(x_T, generators, indices) -> [b, 3, H, W] in [−1, 1]; image i's
    x_T and generator come from image_generators(seed, [i])."""
    def run(idx):
        gens = image_generators(seed, idx.tolist())
        x = sample_fn(torch.stack([torch.randn(shape, generator=g) for g in gens]), gens, idx.tolist())
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    images = map_rows(run, n, min(batch, n), pad=True, progress=world_rank()[1] == 0)
    return images if world_rank()[1] == 0 else None


@torch.no_grad()
def map_rows(fn, n, batch, *, shard=True, pad=False, progress=True, desc="sampling"):
    """torch.cat of fn(rows) over rows 0..n−1, `batch` at a time (fn may return a tuple: each joined alone).
    Under torchrun (shard) process r takes rows r, r + W, ..., each call padded to `batch` rows (also alone
    with pad) with copies of its first (a kernel may round differently at another size), and every process
    gets all n rows in order: the same result for any process count."""
    world, rank = world_rank() if shard else (1, 0)
    rows, out = torch.arange(rank, n, world), []
    for i in tqdm(range(0, max(len(rows), 1), batch), desc=desc, leave=False, disable=not progress):
        r = rows[i:i + batch]                                       # empty on a process with no rows
        y = fn(torch.cat([r, (r[:1] if len(r) else rows.new_zeros(1)).expand(
            batch - len(r) if world > 1 or pad else 0)]))
        out.append([v[:len(r)] for v in (y if isinstance(y, tuple) else (y,))])
    parts = [torch.cat(p) for p in zip(*out)]
    parts = [gather_rows(p, n, world) for p in parts] if world > 1 else parts
    return tuple(parts) if isinstance(y, tuple) else parts[0]


@contextlib.contextmanager
def sampling_mode(net, *, amp="none", compile=False):
    """Sampling a trained model: each fake-quantized weight quantized once for the block (the same values);
    with --compile net.forward torch.compile'd; with --amp bf16 convolutions and matmuls under bf16 autocast
    (as the official DiT samples; DDIM's arithmetic stays fp32). Default: fp32, eager."""
    frozen = [(m, m.weight) for m in net.modules() if getattr(m, "quant_w", False)]
    for m, w in frozen:
        with torch.no_grad():
            m.weight, m.quant_w = nn.Parameter(m.wq(w), requires_grad=False), False
    if compile:
        net.forward = torch.compile(net.forward)                    # an instance attribute, dropped after
    try:
        with torch.autocast(next(net.parameters()).device.type, torch.bfloat16, enabled=amp == "bf16"):
            yield
    finally:
        if compile:
            del net.forward
        for m, w in frozen:
            m.weight, m.quant_w = w, True


def gather_rows(part, n, world):
    """Every process's rows r, r + W, r + 2W, ... (this one's: `part`) back in order 0..n−1, for all."""
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return torch.stack([parts[i % world][i // world] for i in range(n)])


def save_images(images, path):
    """The end of a sharded run: rank 0 (the one with images, uint8 [N, H, W, 3]) writes them as a PNG grid,
    or as .npz under arr_0 (ADM's convention; eval_fid.py reads it). Returns whether this process wrote."""
    if images is None:
        return False
    if path.endswith(".npz"):
        with atomic_write(path) as f:
            np.savez(f, arr_0=images.numpy())
    else:
        save_grid(images.permute(0, 3, 1, 2).float() / 127.5 - 1, path, nrow=min(len(images), 8))
    return True


def load_model(name, ckpt=None, *, cfg_scale=1.0):
    """The Diffusion of a DDPM (models/ddpm.py CONFIGS) or LDM (models/ldm.py CONFIGS) name, with the
    weights of `ckpt` (a path; default: the model's own checkpoint), loaded strictly, in eval mode.
    cfg_scale: the guidance the caller will use, checked against the model (a one-line error)."""
    from models import ddpm, ldm                    # here, so that `python -m models.ldm` runs one copy of it
    if cfg_scale != 1.0 and not (name in ldm.CONFIGS and ldm.CONFIGS[name]["cond_stage"]):
        raise UserError(f"--cfg-scale {cfg_scale}: {name} is not class-conditional; drop the flag")
    if name in ddpm.CONFIGS:
        unet = ddpm.load_unet(name, ckpt)
        res = unet.resolution
        return Diffusion(unet, (3, res, res), linear_alphas_cumprod(), False, nn.Identity(), 0, "mid.attn_1")
    if name in ldm.CONFIGS:
        m = ldm.load_ldm(name, ckpt)
        net = m.unet if m.cond_stage is None else ldm.ClassConditional(m.unet, m.cond_stage)
        feature = ("unet." if m.cond_stage is not None else "") + "middle_block.1"
        classes = m.cond_stage.embedding.num_embeddings - 1 if m.cond_stage is not None else 0
        return Diffusion(net, ldm.CONFIGS[name]["latent"], m.alphas_cumprod, True,
                         ldm.Decode(m.first_stage, m.scale_factor), classes, feature)
    raise UserError(f"unknown model {name!r}; choose one of {', '.join([*ddpm.CONFIGS, *ldm.CONFIGS])}")
