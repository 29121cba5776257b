#!/usr/bin/env bash
# The device figures the README's "running at the paper's scale" section cites, on one GPU in <= 8 minutes:
# full-size models with random weights (the costs do not depend on the values), nothing downloaded.
#   1. sampling forward of the paper's CIFAR-10 UNet (35.7 M): FP vs DilateQuant W4A4 vs EDA-DM W4A8, fp32
#      and bf16 autocast (bench_qforward.py, batch 256)
#   2. DiT-XL/2 (675 M) sampling forward with CFG, batch 32 x 2: FP vs Q-DiT W4A8 (g 128, dynamic), fp32/bf16
#   3. one BKD iteration of every block (bench_dilatequant.py) and one FBR iteration of every unit
#      (bench_edadm.py) at the papers' settings (batch 32), with their full schedules extrapolated
#   4. Q-DiT's GPTQ pass over DiT-XL/2 (256 calibration samples) and one search fitness evaluation at 64
#      of its 800 images (bench_qdit.py)
#   5. FID Inception feature throughput (eval_fid.statistics, batch 250, random Inception weights)
#     bash bench/gpu_check.sh 2>&1 | tee gpu_check.log          # DEVICE=cpu for a (slow) dry run
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
step() { local t=$1; shift; echo "== $* (limit ${t} s)"; timeout "$t" "$@" 2>&1 | grep -v "it/s\]\|s/it\]"
         echo "-- exit ${PIPESTATUS[0]}"; }

step 45 python bench/bench_qforward.py --model ddpm-cifar10 --batch 256 --rounds 3 --device "$DEVICE"
step 45 python bench/bench_qforward.py --model ddpm-cifar10 --batch 256 --rounds 3 --device "$DEVICE" \
     --amp bf16
step 75 python - "$DEVICE" <<'PY'
import sys, time, torch
import qdit
from models.dit import DiT, XL_2, eps_fn
from models import sampling_mode
device = torch.device(sys.argv[1])
fp = DiT(**XL_2, input_size=32).to(device).eval().requires_grad_(False)
names = qdit.gene_layers(fp)
q = qdit.quantize(fp, [128] * len(names), 8, False, "dynamic", adaln_g=128)
qdit.rtn_weights(q, 4, False)
x, t = torch.randn(32, 4, 32, 32, device=device), torch.full((32,), 500.0, device=device)
y = torch.randint(1000, (32,), device=device)
for amp in ("none", "bf16"):
    for name, net in (("FP", fp), ("Q-DiT W4A8 g128 dynamic", q)):
        with torch.no_grad(), sampling_mode(net, amp=amp):
            eps = eps_fn(net, y, 1.5)
            for i in range(6):                                     # 1 warm-up, 5 timed
                if i == 1:
                    torch.cuda.synchronize() if device.type == "cuda" else None
                    t0 = time.perf_counter()
                eps(x, t)
            torch.cuda.synchronize() if device.type == "cuda" else None
        s = (time.perf_counter() - t0) / 5
        print(f"DiT-XL/2 256 px, {name:24s} {amp:4s}: {s * 1e3:7.1f} ms per CFG forward of 32 images "
              f"({32 / s:6.1f} images x steps / s)")
PY
step 75 python bench/bench_dilatequant.py --iters 3 --device "$DEVICE"
step 75 python bench/bench_edadm.py --iters 3 --device "$DEVICE"
step 120 python bench/bench_qdit.py --blocks 28 --calib 256 --fit-n 64 --fit-steps 50 --device "$DEVICE"
step 30 python - "$DEVICE" <<'PY'
import sys, time, torch
import eval_fid
device = torch.device(sys.argv[1])
images = torch.randint(0, 256, (2000, 32, 32, 3), dtype=torch.uint8)
model = eval_fid.InceptionV3()
eval_fid.statistics(images[:250], model, 250, device, progress=False)   # warm-up
t0 = time.perf_counter()
eval_fid.statistics(images, model, 250, device, progress=False)
s = time.perf_counter() - t0
print(f"FID features (32 px -> 299, batch 250): {len(images) / s:.0f} images/s, "
      f"50k images in {50000 * s / len(images) / 60:.1f} min")
PY
