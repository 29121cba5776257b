"""
The sampling forward of a quantized model against the FP one, on the bundled UNet: seconds per forward
at one batch for FP, DilateQuant W4A4 (WD's X/s, TPQ rows, per-channel weights) and EDA-DM W4A8 (per-tensor
activations, AdaRound-shaped weight quantizers at nearest rounding), each built as the scripts build it
(min-max ranges: the cost does not depend on them), then, for both, the same with every weight quantized
once beforehand (what a trained model needs while it samples). FP and the quantized models are timed in
turn, --rounds times, and the medians reported, so that the load of a shared machine hits all alike.

    python bench/bench_qforward.py                   # batch 64, 2-core CPU: about a minute
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dilatequant as dq
import edadm as ed
from common import QuantConv2d, QuantLinear, parse_config, pick_device, run_main
from models import load_model


@dataclass
class Config:
    """Time one sampling forward of the bundled UNet: FP vs DilateQuant W4A4 vs EDA-DM W4A8."""
    batch: int = 64               # images per forward (the methods' quick preset: eval batch 64)
    rounds: int = 7               # timing rounds; each times every model once, after a warm-up
    reps: int = 5                 # forwards per model and round
    device: str = "auto"          # auto, cpu or cuda


class Frozen(nn.Module):
    """A weight quantizer replaced by its output: the weight quantized once."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, w):
        return self.w


@torch.no_grad()
def freeze(model):
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.quant_w:
            m.wq = Frozen(m.wq(m.weight))
    return model


@torch.no_grad()
def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    d = load_model("ddpm-cifar10-small")
    fp = d.net.to(device).requires_grad_(False)
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
    qf, ef = freeze(dq.copy.deepcopy(q)), freeze(dq.copy.deepcopy(e))
    models = {"FP": fp, "DilateQuant W4A4": q, "EDA-DM W4A8": e, "DilateQuant, weights frozen": qf,
              "EDA-DM, weights frozen": ef}
    times = {k: [] for k in models}
    for net in models.values():
        net(x, t)                                                    # warm-up
    for _ in range(cfg.rounds):
        for k, net in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(cfg.reps):
                net(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append((time.perf_counter() - t0) / cfg.reps)
    base = statistics.median(times["FP"])
    print(f"bundled UNet, batch {cfg.batch}, {device}, {torch.get_num_threads()} threads, median of "
          f"{cfg.rounds} rounds x {cfg.reps} forwards")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:30s} {m * 1e3:8.1f} ms  {m / base:5.2f}x FP")


if __name__ == "__main__":
    run_main(main)
