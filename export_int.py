"""
Export a quantized model of any of the three method scripts to a packed integer model (models/intq.py).

    python export_int.py runs/dilatequant/dilatequant.safetensors      # -> dilatequant.int.safetensors
    python -m models.ddpm --load runs/dilatequant/dilatequant.int.safetensors --out grid.png
    python export_int.py runs/qdit/searched.safetensors         # -> runs/qdit/searched.int.safetensors

The saved file is rebuilt with its own script's code (its settings are in its metadata), switched to its
quantized forward, and every quantized layer becomes an IntLinear / IntConv: weight codes (int8 at 5-8 bits,
two per byte at 4 or fewer) with their per-channel or per-group (Δ, z), and the layer's input quantizer as
its parameters: DilateQuant's TPQ row per step (and the 1/s of Weight Dilation as a pre-scale), EDA-DM's
per-tensor step (the split shortcut's two halves as two segments), Q-DiT's dynamic or static groups. The
attention matmul quantizers stay float fake quantizers (intq.TableQuant); everything else (norms,
embeddings, Q-DiT's unquantized layers) stays float. Only the DDPM UNets and DiTs are exported (not LDMs).
"""
import argparse, os, time

import torch

from common import QuantConv2d, QuantLinear, UserError, load_saved, parse_config, read_safetensors, run_main
from models import intq


def static(q, recip):  # a TPQ / EDA-DM ActQuant / Q-DiT static ActQuant -> intq's static spec
    qmax = 2 ** q.bits - 1
    return dict(kind="static", bits=q.bits, delta=q.delta.detach().reshape(-1),
                zero=q.zero.detach().round().clamp(0, qmax).reshape(-1), recip=recip)


def pack(m, w_hat, w_delta, w_zero, *, bits, acts, segments=None, pre_scale=None):
    args = dict(w_bits=bits, w_sym=False, segments=segments, acts=acts, bias=m.bias, pre_scale=pre_scale)
    if isinstance(m, QuantLinear):
        return intq.IntLinear.pack(w_hat, w_delta, w_zero, **args)
    stride, padding, dilation, groups = m.conv_args
    if groups != 1:
        raise UserError("grouped convolutions are not exported")
    return intq.IntConv.pack(w_hat, w_delta, w_zero, stride=stride, padding=padding, dilation=dilation,
                             **args)


def group_grid(w, g, bits):
    """(Δ, z) [O, K/g] of a weight already on a grid per row and group of g columns (Q-DiT keeps ŵ, not its
    grid): Δ the smallest gap between a group's values, divided by the first k (1 ≤ k < 2^b) that puts every
    value on an integer multiple; z sets the lowest code to 0. A group of equal values gets Δ = |value|."""
    O, K = w.shape
    rows = w.detach().reshape(O, K // g, g).double()
    big = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    gap = rows.sort(-1).values.diff(dim=-1)
    gap = torch.where(gap > 1e-5 * big, gap, torch.inf).amin(-1)           # [O, G]
    delta = torch.where(gap.isinf(), big[..., 0], torch.nan)
    for k in range(1, 2 ** bits):
        c = rows / (gap / k)[..., None]
        ok = ((c - c.round()).abs() < 1e-3).all(-1) & (c.round().amax(-1) - c.round().amin(-1) < 2 ** bits)
        delta = torch.where(delta.isnan() & ok, gap / k, delta)
        if not delta.isnan().any():
            break
    if delta.isnan().any():
        raise UserError(f"a {bits}-bit weight group is not on a uniform grid; quantize the model again")
    return delta.float(), -(rows / delta[..., None]).round().amin(-1).float()


def dilatequant_layers(q):
    import dilatequant as dq
    layers, hooks = {}, {}
    for name, m in q.named_modules():
        if isinstance(m, dq.Dilated):
            L, wq = m.layer, m.layer.wq
            a = L.aq
            acts = ([static(a.h, True), static(a.skip, True)] if isinstance(a, dq.SplitTPQ) else
                    static(a, True) if isinstance(a, dq.TPQ) else None)
            segs = [a.split, L.weight.shape[1] - a.split] if isinstance(a, dq.SplitTPQ) else None
            w_delta, w_zero = wq.delta.expand(-1, len(segs or [0])), wq.zero.expand(-1, len(segs or [0]))
            layers[name] = pack(L, wq(L.weight), w_delta, w_zero, bits=wq.bits, acts=acts, segments=segs,
                                pre_scale=m.s.reciprocal().reshape(-1))
        elif isinstance(m, dq.TPQ) and name.rsplit(".", 1)[-1].startswith("act_"):
            hooks[name] = m
    return layers, hooks


def edadm_layers(q):
    import edadm as ed
    layers, hooks, splits = {}, {}, {}
    for name, m in q.named_modules():
        if getattr(m, "split", 0) and isinstance(getattr(m, "shortcut_h", None), ed.ActQuant):
            splits[ed.shortcut(name, m)] = m
            hooks[f"{name}.shortcut_h"] = hooks[f"{name}.shortcut_skip"] = None   # run by the int layer
    for name, m in q.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            wq, blk = m.wq, splits.get(name)
            acts = ([static(blk.shortcut_h, False), static(blk.shortcut_skip, False)] if blk else
                    static(m.aq, False) if isinstance(m.aq, ed.ActQuant) else None)
            segs = [blk.split, m.weight.shape[1] - blk.split] if blk else None
            cols = [0, blk.split] if blk else [0]
            d, z = (t.reshape(len(t), -1)[:, cols] for t in (wq.delta, wq.zero))   # [O, segments]
            layers[name] = pack(m, wq(m.weight), d, z, bits=wq.bits, acts=acts, segments=segs)
        elif isinstance(m, ed.ActQuant) and name.rsplit(".", 1)[-1].startswith("act_"):
            hooks[name] = m
    return layers, hooks


def qdit_layers(q, bits):
    layers = {}
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            a, g = m.aq, m.g
            if m.quant_a and a.dynamic:
                acts = dict(kind="dynamic", bits=a.bits, sym=a.sym, include_zero=a.include_zero)
            elif m.quant_a:
                s, z = intq.dynamic_params(torch.cat([a.lo, a.hi], 1), a.bits, a.sym, a.include_zero)
                acts = [dict(kind="static", bits=a.bits, sym=a.sym, delta=s[j], zero=z[j])
                        for j in range(len(s))]
            else:
                acts = None
            d, z = group_grid(m.weight, g, bits)
            layers[name] = pack(m, m.weight, d, z, bits=bits, acts=acts,
                                segments=[g] * (m.weight.shape[1] // g))
    return layers, {}


def rebuild(path):
    """(tool, quantized model in its quantized forward, settings, model name) of a method's saved file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    meta = read_safetensors(path, metadata=True)[1] if path.endswith(".safetensors") else {}
    tool = next((t for t in ("dilatequant", "edadm", "qdit") if t in meta), None)
    if tool is None:
        raise UserError(f"{path}: not a model saved by dilatequant.py, edadm.py or qdit.py")
    state, saved = load_saved(path, tool)
    if tool == "qdit":
        import qdit as qd
        from models.dit import load_dit
        cfg = parse_config(qd.Config, qd.PRESETS, argv=[], saved={k: v for k, v in saved.items()
                                                                  if k in qd.CARRIED})
        fp = load_dit(cfg.model, cfg.ckpt or None).requires_grad_(False)
        rung = dict(genes=saved["genes"], act=saved["act"], weights=None, adaln_g=saved["adaln_g"])
        cfg.load = path
        return tool, qd.build_rung(fp, rung, cfg, None, st=state), saved, cfg.model
    module = __import__(tool)
    cfg = parse_config(module.Config, module.PRESETS, argv=[], saved=saved)
    if cfg.model.startswith("ldm-"):
        raise UserError(f"{path}: LDMs are not exported (only the DDPM UNets and DiTs)")
    if tool == "edadm":
        module.check_config(cfg)
    from models import load_model
    d = load_model(cfg.model, cfg.ckpt or None)
    fp, cfg.load = d.net.requires_grad_(False), path
    q = module.load_variant(fp, state, saved, cfg, d.example("cpu"))
    module.switch(q, True)
    return tool, q, saved, cfg.model


@torch.no_grad()
def export(path, out):
    tool, q, saved, model = rebuild(path)
    layers, hooks = {"dilatequant": dilatequant_layers, "edadm": edadm_layers}[tool](q) if tool != "qdit" \
        else qdit_layers(q, saved["w_bits"])
    header = dict(model=model, tool=tool, source=os.path.basename(path), steps=saved.get("steps"),
                  hooks={n: h and dict(bits=h.bits, recip=tool == "dilatequant") for n, h in hooks.items()})
    table = lambda t: t.detach().reshape(1, 1) if t.dim() == 0 else t.detach()  # noqa: E731  [T, heads]
    extra = {}
    for n, h in ((n, h) for n, h in hooks.items() if h is not None):
        extra |= {f"{n}.delta": table(h.delta), f"{n}.zero": table(h.zero).round().clamp(0, 2 ** h.bits - 1)}
    extra |= {"eps_k": q.eps_k} if hasattr(q, "eps_k") else {}
    net = intq.architecture(model)
    floats = intq.float_keys(net, layers, hooks)
    sd = q.state_dict()
    missing = [k for k in floats if k not in sd]
    if missing:
        raise UserError(f"{path}: the model lacks {missing[:3]}")
    sizes = intq.save_packed(out, layers, extra | {k: sd[k] for k in floats}, header)
    fp32 = sum(4 * m.layout["out"] * (m.bounds[-1][1] + m.layout["bias"]) for m in layers.values())
    return layers, sizes | dict(hooks=sum(h is not None for h in hooks.values()), fp32_bytes=fp32)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("path", help="a .safetensors that dilatequant.py, edadm.py or qdit.py saved (its --out)")
    p.add_argument("--out", default="", help="output file (default: PATH with .int.safetensors)")
    args = p.parse_args()
    out = args.out or args.path.removesuffix(".safetensors") + ".int.safetensors"
    t0 = time.time()
    layers, sizes = export(args.path, out)
    kinds = {}
    for name, m in layers.items():
        kinds.setdefault(m.kind, []).append(name)
    for kind, names in kinds.items():
        print(f"{len(names):4d} layers  {kind}")
    if sizes["hooks"]:
        print(f"{sizes['hooks']:4d} hooks   attention matmul inputs: float fake quantizers (intq.TableQuant)")
    mib = {k: v / 2 ** 20 for k, v in sizes.items()}
    print(f"{out}: {mib['file_bytes']:.2f} MiB; quantized layers {mib['packed_bytes']:.3f} MiB packed vs "
          f"{mib['fp32_bytes']:.3f} MiB fp32 ({sizes['fp32_bytes'] / sizes['packed_bytes']:.2f}x smaller); "
          f"float rest {mib['extra_bytes']:.3f} MiB; {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(main)
