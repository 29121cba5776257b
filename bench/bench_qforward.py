"""
The sampling forward of a quantized model against the FP one, on a DDPM UNet: seconds per forward
at one batch for FP, DilateQuant W4A4 (WD's X/s, TPQ rows, per-channel weights) and EDA-DM W4A8 (per-tensor
activations, AdaRound-shaped weight quantizers at nearest rounding), each built as the scripts build it
(min-max ranges: the cost does not depend on them), then, for both, the same with every weight quantized
once beforehand (models.sampling_mode: how the scripts sample a trained model). FP and the quantized
models are timed in turn, --rounds times, and the medians reported, so that the load of a shared machine
hits all alike. --amp bf16 times all of them under bf16 autocast (a GPU's setting).

    python bench/bench_qforward.py                   # bundled UNet, batch 64, 2-core CPU: about a minute
    python bench/bench_qforward.py --model ddpm-cifar10 --batch 256 --device cuda --amp bf16
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dilatequant as dq
import edadm as ed
from common import parse_config, pick_device, run_main
from models import ddpm, load_model, sampling_mode


@dataclass
class Config:
    """Time one sampling forward of a DDPM UNet: FP vs DilateQuant W4A4 vs EDA-DM W4A8."""
    model: str = "ddpm-cifar10-small"  # the bundled UNet, or ddpm-cifar10 (the paper's size, random weights)
    batch: int = 64               # images per forward (the methods' quick preset: eval batch 64)
    rounds: int = 7               # timing rounds; each times every model once, after a warm-up
    reps: int = 5                 # forwards per model and round
    device: str = "auto"          # auto, cpu or cuda
    amp: str = "none"             # none, or bf16: every model under bf16 autocast (models.sampling_mode)


@torch.no_grad()
def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    d = load_model("ddpm-cifar10-small")
    if cfg.model != "ddpm-cifar10-small":                            # the same interface, random weights
        d = d._replace(net=ddpm.UNet(**ddpm.CONFIGS[cfg.model]), shape=(3, 32, 32))
    fp = d.net.eval().to(device).requires_grad_(False)
    ex = d.example(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, *d.shape, generator=g).to(device)
    t = torch.full((cfg.batch,), 500.0, device=device)
    calib = dict(x=x, t=t, idx=torch.zeros(cfg.batch, dtype=torch.long, device=device))
    q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=20, example=ex, steps=20)
    dq.init_tpq(q, calib, 20, search=False, batch=cfg.batch)
    dq.switch(q, True)
    dq.set_step(q, torch.zeros(1, dtype=torch.long, device=device))  # sampling: one step's row per batch
    e = ed.quantize(fp, 4, 8, 8, search=False, example=ex)
    ed.init_acts(e, calib, False, cfg.batch)
    ed.switch(e, True)
    models = {"FP": (fp, False), "DilateQuant W4A4": (q, False), "EDA-DM W4A8": (e, False),
              "DilateQuant, weights frozen": (q, True), "EDA-DM, weights frozen": (e, True)}
    times = {k: [] for k in models}

    def run(net, frozen, reps):  # frozen: as the methods sample, each weight quantized once (sampling_mode)
        amp = torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp == "bf16")
        with sampling_mode(net, amp=cfg.amp) if frozen else amp:
            for _ in range(reps):
                net(x, t)
    for net, frozen in models.values():
        run(net, frozen, 1)                                          # warm-up
    for _ in range(cfg.rounds):
        for k, (net, frozen) in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            run(net, frozen, cfg.reps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append((time.perf_counter() - t0) / cfg.reps)
    base = statistics.median(times["FP"])
    print(f"{cfg.model}, batch {cfg.batch}, {device}, amp {cfg.amp}, {torch.get_num_threads()} threads, "
          f"median of {cfg.rounds} rounds x {cfg.reps} forwards")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:30s} {m * 1e3:8.1f} ms  {m / base:5.2f}x FP")


if __name__ == "__main__":
    run_main(main)
