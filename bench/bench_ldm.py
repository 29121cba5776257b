"""
Cost of DilateQuant's BKD (W4A4) and EDA-DM's FBR (W4A8) at the papers' LDM settings (the LDM presets of
dilatequant.py / edadm.py: N, iterations per unit, γ, LRs, TPQ rows T = steps; cin256-v2 under CFG caches
cond + uncond inputs), on the full-size LSUN-Bedroom LDM-4, LSUN-Church LDM-8 and ImageNet cin256-v2 UNets
with random weights (the cost does not depend on the values). Per model and method:
  1. the units, from blocks_in_order / units_in_order traced on the example inputs;
  2. the fp16 CPU cache of each unit (the presets' cpu_cache layout), N × (inputs + output [+ FBR's layer
     outputs; EDA-DM holds both the FP and the quantized inputs]), exact from the shapes of one traced
     forward at batch 1: the largest unit and the total over units;
  3. seconds per training iteration of the timed units (rep: the first ResBlock, the first attention unit,
     the middle block's first ResBlock, the last output ResBlock with the split shortcut) through the real
     block_io / unit_io + distill_block / reconstruct_unit, the io points' cache repeated to the batch.
     Timed at --batch and --batch/4: an iteration is w + v·batch (w: weights, optimizer, overhead), which
     extrapolates a smaller --batch to the papers' 32. Untimed units: c_p·params + 32·(c_m·MACs +
     c_e·attention-matrix elements), the rates fitted on the timed units. Full run = Σ units × iterations
     per unit; the caching passes (FP and quantized forwards over N up to each unit) apart, from the FP
     forward at batch 1. Peak memory: GPU allocations per method, else the process's peak RSS so far.

    python bench/bench_ldm.py                       # all three models, ~10-15 min on a 2-core CPU
    python bench/bench_ldm.py --models ldm-lsun-church --units all
    python bench/bench_ldm.py --device cuda --batch 32 --units all
"""
import gc, os, sys, time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dilatequant as dq
import edadm as ed
from common import UserError, parse_config, parse_list, peak_mb, pick_device, run_main, write_record
from models import ldm

MODELS = ("ldm-lsun-bedroom", "ldm-lsun-church", "ldm-cin256-v2")
ATTENTION = ("AttentionBlock", "BasicTransformerBlock")
KINDS = ("ResBlock", "Downsample", "Upsample") + ATTENTION           # else "layer": a lone conv/linear


@dataclass
class Config:
    """Time DilateQuant's BKD and EDA-DM's FBR on the full-size LDM UNets at the papers' settings."""
    models: str = ",".join(MODELS)  # comma-separated: ldm-lsun-bedroom, ldm-lsun-church, ldm-cin256-v2
    methods: str = "dilatequant,edadm"  # comma-separated: dilatequant (BKD), edadm (FBR)
    units: str = "rep"             # timed units: rep (4 representative), all, none or comma-separated names
    iters: int = 3                 # timed iterations per unit and batch (after one warm-up iteration)
    batch: int = 8                 # timing batch (and batch/4); w + v·batch extrapolated to --paper-batch
    paper_batch: int = 32          # the papers' batch (both: 32)
    io_points: int = 2             # calibration inputs run through block_io / unit_io, repeated to --batch
    device: str = "auto"           # auto, cpu or cuda
    out: str = "runs/bench_ldm.json"  # JSON record


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size(name, device):
    """The model's ε network with random weights, example inputs (batch 1), its classes (0: none)."""
    torch.manual_seed(0)
    cfg = ldm.CONFIGS[name]
    net, classes = ldm.UNetModel(**cfg["unet"]), (cfg["cond_stage"] or {}).get("n_classes", 1) - 1
    net = ldm.ClassConditional(net, ldm.ClassEmbedder(**cfg["cond_stage"])) if classes else net
    example = (torch.randn(1, *cfg["latent"]), torch.full((1,), 500.0)) + (torch.zeros(1).long(),)[:classes]
    return net.eval().requires_grad_(False).to(device), tuple(a.to(device) for a in example), classes


@torch.no_grad()
def trace(fp, example, names, device):
    """One FP forward at batch 1 with hooks. Per module in `names`: (input, output) elements and the MACs run
    when it finished; per conv/linear and attention (name + ".attn"): MACs (conv: out · C_in/groups · k²;
    QKᵀ and softmax·V: 2 · [h, T, S] · d) and attention-matrix elements. Also the forward's seconds."""
    mods, io, macs, elems, done, sm = dict(fp.named_modules()), {}, {}, {}, {}, {}

    def hook(n, what):
        def f(m, args, out):
            if what == "io":
                io[n] = (sum(a.numel() for a in args if torch.is_tensor(a)), out.numel())
                done[n] = sum(macs.values())
            elif what == "layer":
                macs[n] = out.numel() * (m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel())
            elif what == "softmax":
                sm[n] = out.shape
            else:                                                    # act_v: d from v's size
                elems[n + ".attn"] = sm[n].numel()
                macs[n + ".attn"] = 2 * sm[n].numel() * out.numel() // (sm[n][0] * sm[n][-1])
        return f

    hooks = [mods[n].register_forward_hook(hook(n, "io")) for n in names]
    for n, m in mods.items():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(n, "layer")))
        if hasattr(m, "act_softmax"):
            hooks += [m.act_softmax.register_forward_hook(hook(n, "softmax")),
                      m.act_v.register_forward_hook(hook(n, "v"))]
    sync(device)
    t0 = time.time()
    fp(*example)
    sync(device)
    for h in hooks:
        h.remove()
    return io, macs, elems, done, time.time() - t0


def representative(units, kinds, fmods):
    res = [u for u in units if kinds[u] == "ResBlock"]
    pick = res[:1] + [u for u in units if kinds[u] in ATTENTION][:1]
    pick += [u for u in res if u.endswith("middle_block.0")] + [u for u in res if fmods[u].split][-1:]
    return list(dict.fromkeys(pick))


def prepare(method, fp, example, io, steps):
    """The quantized copy (min-max ranges from the io points: the training cost does not depend on them)
    and its units in execution order."""
    if method == "dilatequant":
        q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=steps, example=example)
        dq.init_tpq(q, io, steps, search=False)
        return q, dq.blocks_in_order(q, example)
    q = ed.quantize(fp, 4, 8, 8, search=False, example=example)
    ed.init_acts(q, io, search=False)
    return q, ed.units_in_order(q, example)


def time_unit(method, fp, q, name, io, cfg, *, model, steps, g, device):
    """(w, v): seconds per iteration = w + v·batch of one unit, from iterations at batch/4 and at batch, its
    cache filled by the real block_io / unit_io on the io points (repeated to the batch)."""
    fmod, qmod, n = dict(fp.named_modules())[name], dict(q.named_modules())[name], len(io["x"])
    tile = lambda a: a[torch.arange(cfg.batch) % len(a)]  # noqa: E731
    if method == "dilatequant":
        _, target = dq.block_io(fp, fmod, io, n, True, cpu_cache=True)               # FP output
        dq.switch(q, True)
        q_in, _ = dq.block_io(q, qmod, io, n, False, cpu_cache=True)                 # quantized input
        t_idx = torch.randint(steps, (cfg.batch,), generator=g).to(device)      # the samples' steps
        args = (qmod, [tile(a) for a in q_in], tile(target), t_idx)
        kw = dict(lr_w=dq.Config.lr_w, lr_q=dq.Config.lr_q, lr_z=dq.Config.lr_z, generator=g)
        step = lambda k, b: dq.distill_block(*args, iters=k, batch=b, **kw)  # noqa: E731
    else:
        layers = ed.inner_layers(qmod)                               # γ > 0 in every LDM preset
        x_fp, y_fp, o_fp = ed.unit_io(fp, fmod, io, n, layers, cpu_cache=True)
        ed.switch(q, True)
        x_q = [tile(a) for a in ed.unit_io(q, qmod, io, n, cpu_cache=True)[0]]
        fp_io = ([tile(a) for a in x_fp], tile(y_fp), [tile(a) for a in o_fp])
        lr_w, lr_a = ed.LRS[model][1]                                # the official W4 rates
        kw = dict(gamma=ed.PRESETS[model]["gamma"], lr_w=lr_w, lr_a=lr_a, qdrop=ed.Config.qdrop,
                  round_reg=ed.Config.round_reg, generator=g)
        step = lambda k, b: ed.reconstruct_unit(qmod, fp_io, x_q, layers, iters=k, batch=b, **kw)  # noqa
    small, flags, sec = max(1, cfg.batch // 4), [(p, p.requires_grad) for p in qmod.parameters()], {}
    for b, k in ((small, 1), (small, cfg.iters), (cfg.batch, 1), (cfg.batch, cfg.iters)):  # warm-up, timed
        for p, f in flags:                           # each call freezes what it trained: trainable again
            p.requires_grad_(f)
        sync(device)
        t0 = time.time()
        step(k, b)
        sync(device)
        sec[b] = (time.time() - t0) / k
    s1, s2 = sec[small], sec[cfg.batch]
    v = max(s2 - s1, 0) / (cfg.batch - small) if cfg.batch > small else s2 / cfg.batch
    return max(s2 - v * cfg.batch, 0.0), v


def extrapolate(feats, batch):
    """Seconds per iteration at `batch` of every unit: w + batch·v where timed, else c_p·params +
    batch·(c_m·MACs + c_e·attention elements): c_p from the timed units' w, c_m from the v of the timed
    units without attention (all if none), c_e from what c_m leaves of the timed attention units' v (0 when
    none is timed: attention then underestimated)."""
    meas = [u for u, f in feats.items() if f["w_v"]]
    total = lambda f, us: sum(f(feats[u]) for u in us) or 1e-30  # noqa: E731
    c_p = total(lambda f: f["w_v"][0], meas) / total(lambda f: f["params"], meas)
    conv = [u for u in meas if not feats[u]["elems"]] or meas
    c_m = total(lambda f: f["w_v"][1], conv) / total(lambda f: f["macs"], conv)
    att = [u for u in meas if feats[u]["elems"]]
    c_e = total(lambda f: max(f["w_v"][1] - c_m * f["macs"], 0), att) / total(lambda f: f["elems"], att)
    return {u: f["w_v"][0] + batch * f["w_v"][1] if f["w_v"] else
            c_p * f["params"] + batch * (c_m * f["macs"] + (c_e * f["elems"] if att else 0))
            for u, f in feats.items()}


def bench(method, model, fp, example, classes, cfg, device):
    """One method on one model: units, cache sizes, timed units, the extrapolated full run."""
    pre, g = (dq if method == "dilatequant" else ed).PRESETS[model], torch.Generator().manual_seed(0)
    steps, copies = pre["steps"], 2 if pre.get("cfg_scale", 1.0) != 1.0 and method == "edadm" else 1
    N = pre["calib"] * copies                                        # network inputs cached per unit
    io = dict(x=torch.randn(cfg.io_points, *example[0].shape[1:], generator=g),
              t=torch.randint(1, 1000, (cfg.io_points,), generator=g).float(),
              idx=torch.zeros(cfg.io_points, dtype=torch.long))     # one step: one init_tpq group
    if classes:
        io["y"] = torch.randint(classes + 1, (cfg.io_points,), generator=g)  # class 1000: unconditional
    io = {k: v.to(device) for k, v in io.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    q, units = prepare(method, fp, example, io, steps)
    fmods, qmods = dict(fp.named_modules()), dict(q.named_modules())
    inner = {u: ed.inner_layers(qmods[u]) if method == "edadm" else [] for u in units}
    names = units + [f"{u}.{n}" for u in units for n in inner[u]]   # units, FBR's layers inside them
    io_n, macs, elems, done, fwd = trace(fp, example, names, device)
    under = lambda d, u: sum(v for k, v in d.items() if k == u or k.startswith(u + "."))  # noqa: E731
    kind = lambda m: type(m).__name__ if type(m).__name__ in KINDS else "layer"  # noqa: E731
    feats = {u: dict(kind=kind(fmods[u]), macs=under(macs, u), elems=under(elems, u), w_v=None,
                     params=sum(p.numel() for p in fmods[u].parameters()),
                     cache_gb=N * 2e-9 * (io_n[u][0] * (2 if method == "edadm" else 1) + io_n[u][1]
                                          + sum(io_n[f"{u}.{n}"][1] for n in inner[u]))) for u in units}
    pick = dict(rep=representative(units, {u: f["kind"] for u, f in feats.items()}, fmods), all=units,
                none=[]).get(cfg.units)
    pick = parse_list(cfg.units, units, "--units") if pick is None else pick
    for u in pick:
        w, v = feats[u]["w_v"] = time_unit(method, fp, q, u, io, cfg, model=model, steps=steps, g=g,
                                           device=device)
        print(f"  {method:11s} {u:42s} {feats[u]['kind']:21s} {feats[u]['macs'] / 1e9:6.2f} GMAC/image "
              f"{w + cfg.paper_batch * v:8.2f} s/iteration at batch {cfg.paper_batch} (w {w:.2f} s + "
              f"{v * 1e3:.0f} ms/sample)", flush=True)
    est = extrapolate(feats, cfg.paper_batch) if pick else dict.fromkeys(units)
    for u, f in feats.items():
        f["s_per_iter"] = est[u]
    per_iter = sum(est.values()) if pick else None                   # None: no unit timed (--units none)
    biggest, cache = max(units, key=lambda u: feats[u]["cache_gb"]), [f["cache_gb"] for f in feats.values()]
    del q
    gc.collect()
    return dict(units=len(units), kinds=dict(Counter(f["kind"] for f in feats.values())), N=N, steps=steps,
                iters_per_unit=pre["iters"], largest_unit=biggest, largest_cache_gb=max(cache),
                total_cache_gb=sum(cache), timed_batch=cfg.batch, iter_all_units_s=per_iter,
                timed_share=per_iter and sum(est[u] for u in pick) / per_iter, fp_forward_s=fwd,
                train_h=per_iter and per_iter * pre["iters"] / 3600, peak_mb=peak_mb(device),
                caching_h=sum(2 * N * fwd * done[u] / sum(macs.values()) for u in units) / 3600,
                gmac_per_image=sum(macs.values()) / 1e9, per_unit=feats)


def main():
    cfg = parse_config(Config)
    device = pick_device(cfg.device)
    models = parse_list(cfg.models, MODELS, "--models")
    methods = parse_list(cfg.methods, ("dilatequant", "edadm"), "--methods")
    if not 1 <= cfg.batch <= cfg.paper_batch or cfg.iters < 1 or cfg.io_points < 1:
        raise UserError("need 1 <= --batch <= --paper-batch, --iters >= 1, --io-points >= 1")
    t0, results = time.time(), {}
    print(f"{device} ({torch.get_num_threads()} threads); timed at batch {cfg.batch} and "
          f"{max(1, cfg.batch // 4)}, w + v·batch extrapolated to {cfg.paper_batch}")
    for model in models:
        fp, example, classes = full_size(model, device)
        print(f"{model}: {sum(p.numel() for p in fp.parameters()) / 1e6:.1f} M parameters", flush=True)
        results[model] = {m: bench(m, model, fp, example, classes, cfg, device) for m in methods}
        del fp
        gc.collect()
    print(f"\n{'model':17s} {'method':11s} {'units':>5s} {'N':>5s} {'cache GB max/total':>18s} "
          f"{'s/it all':>8s} {'timed':>5s} {'iters':>5s} {'train h':>7s} {'caching h':>9s} {'peak MB':>7s}")
    for model, by_method in results.items():
        for m, r in by_method.items():
            cell = lambda k, f: "-" if r[k] is None else format(r[k], f)  # noqa: E731  (--units none)
            print(f"{model:17s} {m:11s} {r['units']:5d} {r['N']:5d} {r['largest_cache_gb']:8.2f} / "
                  f"{r['total_cache_gb']:7.1f} {cell('iter_all_units_s', '8.1f')} "
                  f"{cell('timed_share', '5.0%')} {r['iters_per_unit']:5d} {cell('train_h', '7.0f')} "
                  f"{r['caching_h']:9.1f} {r['peak_mb']:7.0f}")
            print(f"{'':29s} {', '.join(f'{k} {v}' for k, v in r['kinds'].items())}")
    print(f"s/it all: one iteration of every unit at batch {cfg.paper_batch} (timed: the share measured); "
          "train h: that x iterations per unit; caching h: 2 x N x the FP forward up to each unit; peak: "
          + ("GPU allocations of the method" if device.type == "cuda" else "the process's RSS so far"))
    write_record(cfg.out, cfg, results, time.time() - t0, device)
    print(f"record: {cfg.out}")


if __name__ == "__main__":
    run_main(main)
