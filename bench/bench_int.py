"""
Real integer inference (models/intq.py) on the DDPM CIFAR-10 UNet against FP32 and fake quant: every
Conv2d/Linear a common.QuantConv2d/QuantLinear (per-channel min-max weights, per-tensor static inputs with the
min-max of one FP forward over random x_t at random t), W8A8 and W4A8, packed into IntConv/IntLinear; the
full-size UNet with seeded random weights (no download), the bundled one with its own. Printed: weight bytes,
seconds per ε forward (medians of rounds that each time every model once), ||ε_int − ε_fq||_max / ||ε_fq||_max
in float32 and in float64 (2 images: the integer arithmetic is exact; in float32 a rounding difference flips
an activation code somewhere and it propagates), the peak RSS of 2 DDIM steps of the full-size model loaded
from its file by a child process, and last a JSON line: the full-size UNet at W8A8.

    python bench/bench_int.py                      # about 2.5 minutes on 2 idle cores
"""
import copy, json, os, resource, statistics, subprocess, sys, tempfile, time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (QuantConv2d, QuantLinear, ddim_sample, ddim_timesteps, linear_alphas_cumprod,
                    parse_config, read_safetensors, run_main, save_safetensors)
from models import intq
from models.ddpm import CONFIGS, UNet, load_unet

QUANT = (QuantLinear, QuantConv2d)


@dataclass
class Config:
    """Size and time the integer UNet against FP32 and fake quant (CPU)."""
    batch: int = 64               # images per forward
    model: str = "ddpm-cifar10"   # the large model: its CONFIGS architecture, random weights
    rounds: int = 3               # timing rounds, after one warm-up round
    threads: int = 2              # torch.set_num_threads
    seed: int = 0                 # weights of the large model, inputs
    rss: bool = True              # peak RSS of a short sampling run from the file (child processes)
    child: str = ""               # internal: sample from this file, print the peak RSS in MB


def exact_check(q, n, x, t):
    """The max-norm relative error in float64, the fake-quant weights frozen at their float32 grid values."""
    q, n = copy.deepcopy(q), copy.deepcopy(n).double()
    for m in q.modules():
        if isinstance(m, QUANT):
            m.weight = nn.Parameter(m.wq(m.weight))
    ref = q.double()(x.double(), t)
    return ((n(x.double(), t) - ref).abs().max() / ref.abs().max()).item()


def child(cfg):
    """The UNet from a file, built on the meta device so that no other copy of its weights is made (packed:
    intq.load_int_model), 2 DDIM steps at --batch; prints the peak RSS in MB."""
    if cfg.child.endswith(".int.safetensors"):
        net = intq.load_int_model(cfg.child)[0]
    else:
        with torch.device("meta"):
            net = UNet(**CONFIGS[cfg.model]).eval()
        net.load_state_dict(read_safetensors(cfg.child), assign=True)
    with torch.no_grad():
        ddim_sample(net, torch.randn(cfg.batch, 3, 32, 32), ddim_timesteps("quad", 2),
                    linear_alphas_cumprod())
    status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
    kib = int(status.split("VmHWM:")[1].split()[0]) if "VmHWM:" in status else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # Linux's keeps the parent's peak (fork)
    print(kib / 1024)


@torch.no_grad()
def bench(cfg, name, net):
    """Print one UNet's table; return its W8A8 JSON record and the models."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    xc, x = torch.randn(2, cfg.batch, 3, 32, 32, generator=g)              # calibration, evaluation
    tc, t = torch.randint(0, 1000, (2, cfg.batch), generator=g).float()
    fp_bytes = sum(p.nbytes for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                   for p in m.parameters())
    models, rows = {"FP32": net}, {}
    for s, (wb, ab) in {"W8A8": (8, 8), "W4A8": (4, 8)}.items():
        q = intq.minmax_model(net, wb, ab, xc, tc)
        n = intq.packed_model(q)
        layers = [m for m in n.modules() if isinstance(m, intq._IntLayer)]
        ref = q(x, t)
        rows[s] = dict(packed=sum(map(intq.packed_bytes, layers)), kinds=Counter(m.kind for m in layers),
                       err=((n(x, t) - ref).abs().max() / ref.abs().max()).item(),
                       err64=exact_check(q, n, x[:2], t[:2]))
        models |= {f"fake quant {s}": q, f"integer {s}": n}
    times = {k: [] for k in models}
    for r in range(cfg.rounds + 1):                                    # round 0: warm-up
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x, t)
            times[k] += [time.perf_counter() - t0] if r else []
    sec = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters), batch {cfg.batch}, "
          f"{torch.get_num_threads()} threads, median of {cfg.rounds} rounds; max rel err vs fake quant")
    print(f"{'':18s} {'weight MB':>9s} {'ratio':>6s} {'s/forward':>9s} {'vs FP32':>8s} {'err fp32':>9s} "
          f"{'err fp64':>9s}")
    print(f"{'FP32':18s} {fp_bytes / 2**20:9.2f} {1:6.2f} {sec['FP32']:9.3f} {1:7.2f}x")
    for s, row in rows.items():
        fq, it = sec[f"fake quant {s}"], sec[f"integer {s}"]
        print(f"{'fake quant ' + s:18s} {'':9s} {'':6s} {fq:9.3f} {sec['FP32'] / fq:7.2f}x")
        print(f"{'integer ' + s:18s} {row['packed'] / 2**20:9.2f} {fp_bytes / row['packed']:6.2f} {it:9.3f} "
              f"{sec['FP32'] / it:7.2f}x {row['err']:9.2e} {row['err64']:9.2e}")
        print("  layers: " + "; ".join(f"{v} {k}" for k, v in row["kinds"].items()))
    print("  float elsewhere: GroupNorm, SiLU, attention matmuls, softmax, upsampling, timestep embedding")
    w8 = rows["W8A8"]
    return dict(weight_bytes_fp32=fp_bytes, weight_bytes_int=w8["packed"], seconds_fp32=sec["FP32"],
                seconds_int=sec["integer W8A8"], max_rel_err=w8["err"], max_rel_err_fp64=w8["err64"],
                weight_bytes_int_w4=rows["W4A8"]["packed"], seconds_int_w4=sec["integer W4A8"]), models


def rss(cfg, models):
    """Save the FP32 and the integer full-size models; the peak RSS of each file's sampling run (child)."""
    def peak_rss(path):
        out = subprocess.run([sys.executable, __file__, "--child", path, "--model", cfg.model, "--batch",
                              str(cfg.batch), "--threads", str(cfg.threads)], capture_output=True, text=True)
        return f"{float(out.stdout.split()[-1]):.0f}" if out.returncode == 0 else f"failed {out.stderr[-99:]}"
    with tempfile.TemporaryDirectory() as d:
        save_safetensors(models["FP32"].state_dict(), fp := os.path.join(d, "fp32.safetensors"))
        peak = {"FP32": peak_rss(fp)}
        for s in ("W8A8", "W4A8"):
            n = models[f"integer {s}"]
            mods = {k: m for k, m in n.named_modules() if isinstance(m, intq._IntLayer)}
            rest = {k: v for k, v in n.state_dict().items() if k.rpartition(".")[0] not in mods}
            p = os.path.join(d, f"{s}.int.safetensors")
            size = intq.save_packed(p, mods, rest, dict(setting=s, model=cfg.model))
            peak[s] = peak_rss(p)
            mb = {k: f"{v / 2**20:.2f} MB" for k, v in size.items()}
            print(f"{s} file {mb['file_bytes']}: {mb['packed_bytes']} packed layers, "
                  f"{mb['extra_bytes']} float rest")
    print(f"peak RSS MB, 2 DDIM steps at batch {cfg.batch} from the file: "
          + ", ".join(f"{k} {v}" for k, v in peak.items()))
    return {f"peak_rss_mb_{k.lower()}": v for k, v in peak.items()}


def main():
    cfg = parse_config(Config)
    torch.set_num_threads(cfg.threads)
    if cfg.child:
        return child(cfg)
    bench(cfg, "ddpm-cifar10-small (bundled, trained)", load_unet("ddpm-cifar10-small"))
    torch.manual_seed(cfg.seed)
    result, models = bench(cfg, f"{cfg.model} (random weights)", UNet(**CONFIGS[cfg.model]).eval())
    result |= rss(cfg, models) if cfg.rss else {}
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
