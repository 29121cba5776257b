"""
Real low-bit integer inference for the fake-quantized layers of this repository: the integer layers, their
file, and a whole packed network (export_int.py writes one from any method's saved model).

A fake-quantized layer computes y = F.linear/conv(Q_a(x·p), Q_w(W)) + b in float, Q mapping v to Δ (c − z)
with the integer code c = clamp(round(v/Δ) + z, qmin, qmax). Here the codes stay integers and the layer is
evaluated as in Jacob et al. 2018 (arXiv 1712.05877, Eqs. 4-7), over input-channel segments j of K_j columns:

    y[m, o] = b[o] + Σ_j s_a[m, j] s_w[o, j] acc_j[m, o]
    acc_j = Σ_{k∈j} (a[m, k] − z_a)(w[o, k] − z_w) = a·w − z_w Σ_k a[m, k] + z_a (K_j z_w − Σ_k w[o, k])

a·w is one int8 × int8 -> int32 torch._int_mm per segment, whose weight matrix gets a row of ones when z_w ≠ 0
so that the same GEMM returns Σ_k a; the bracket after z_a is a constant of the layer (`colcorr`). With a
static activation quantizer the z_a term is a precomputed int32 table (`zbias`, a row per quantizer row t)
and s_a s_w another (`scale`): one multiply per output dequantizes the corrected sum. One segment is
per-output-channel quantization, two a split shortcut (EDA-DM, DilateQuant), many Q-DiT's groups.

Codes are stored signed: the unsigned grid [0, 2^b − 1] is shifted by 2^(b−1) (8-bit codes fit int8) and so
is the zero point, which leaves each c − z unchanged. Weights of 4 bits or fewer are packed two per byte and
unpacked at each forward. Activation quantizers, one per segment: "static" (a table of rows Δ[T], z[T] picked
by the module's `t_idx`: an int, or a LongTensor [B] of per-sample rows, DilateQuant's per-step quantizer;
T = 1 always uses row 0), "dynamic" (IntLinear only: per token and segment min-max, Q-DiT's qdit.qparams),
or None (that segment's input stays float and meets the dequantized weights in a float matmul or conv).
"""
import copy
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (QuantConv2d, QuantLinear, Quantizer, UserError, minmax_range, qrange, quant_params,
                    read_safetensors, replace_modules, save_safetensors, set_quant)

FORMAT = "intq-1"
QUANT = (QuantLinear, QuantConv2d)   # the fake-quant layers of common.py
CHUNK = 1 << 22          # bytes of im2col columns per GEMM (IntConv)
STATE = ("codes", "w_scale", "w_zero", "bias", "pre_scale", "a_delta", "a_zero")   # the tensors a file keeps


def pack_int4(codes):
    """int8 codes in [−8, 7], any shape -> uint8 [⌈n/2⌉]: code 2i in the low nibble, 2i+1 in the high one
    (4-bit two's complement); an odd count is padded with a 0."""
    c = codes.reshape(-1)
    if c.dtype != torch.int8 or (c.numel() and (c.min() < -8 or c.max() > 7)):
        raise ValueError("pack_int4 takes int8 codes in [-8, 7]")
    u = torch.cat([c, c.new_zeros(c.numel() % 2)]).view(torch.uint8) & 0xF
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed, n):
    """The first n int8 codes of pack_int4's bytes; a nibble v in [0, 15] is the code (v XOR 8) − 8."""
    nib = torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)[:n].view(torch.int8)
    return (nib ^ 8) - 8


def int_mm(a, b, pad=None):
    """a [M, K] int8 @ b [K, N] int8 -> int32 [M, N] by torch._int_mm. The CPU takes any shape; CUDA's kernel
    needs M > 16 and K, N multiples of 8, so there (pad=None: when a is on CUDA) both are zero-padded, which
    adds 0 to every dot product, and the result is sliced back. The CUDA path is untested. K = 1 is an outer
    product (CPU _int_mm returns garbage there, torch 2.13)."""
    if a.shape[1] == 1:
        return a.int() * b.int()
    if not (a.is_cuda if pad is None else pad):
        return torch._int_mm(a, b)
    (M, K), N = a.shape, b.shape[1]
    m, k, n = max(M, 17), -(-K // 8) * 8, -(-N // 8) * 8
    return torch._int_mm(F.pad(a, (0, k - K, 0, m - M)), F.pad(b, (0, n - N, 0, k - K)))[:M, :N]


def im2col(x, kernel, stride, dilation):
    """x [B, H, W, C] channels-last, padded, any dtype (F.unfold has no int8 kernel) -> (cols [B·Ho·Wo,
    kh·kw·C], Ho, Wo), column (i·kw + j)·C + c; the weights' columns are reordered to match (F.unfold and the
    file are channel-major: c·kh·kw + i·kw + j). One strided view and one copy of runs of C bytes (none for a
    1×1 stride-1 conv); .contiguous(): with one output row, reshape returns a view whose rows overlap."""
    (B, H, W, C), (kh, kw), (sh, sw), (dh, dw) = x.shape, kernel, stride, dilation
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sB, sH, sW, sC = x.stride()
    cols = x.as_strided((B, Ho, Wo, kh, kw, C), (sB, sH * sh, sW * sw, sH * dh, sW * dw, sC))
    return cols.reshape(B * Ho * Wo, kh * kw * C).contiguous(), Ho, Wo


def act_codes(x, delta, zero, bits, sym, *, out=None, recip=False):
    """Q_a's codes shifted to int8, clamp(round(x/Δ) + z − s, qmin − s, qmax − s) with s = 2^(b−1) on the
    unsigned grid, 0 on the symmetric one: common.fake_quant's float operations, hence its integers (recip:
    x·(1/Δ), as DilateQuant's TPQ samples; it rounds differently at rare ties). out: an int8 view to write
    them into (the interior of a padded channels-last buffer)."""
    (qmin, qmax), s = qrange(bits, sym), 0 if sym else 2 ** (bits - 1)
    c = x * delta.reciprocal() if recip else torch.div(x, delta)
    c = c.round_().add_(zero - s).clamp_(qmin - s, qmax - s)
    return c.to(torch.int8) if out is None else out.copy_(c)


def dynamic_params(rows, bits, sym, include_zero):
    """Q-DiT's per-token (s, z) of rows [M, K_j] (qdit.qparams: min-max, floor 1e-5 on the range)."""
    return quant_params(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), bits, sym, include_zero,
                        eps=1e-5 if sym else 1e-5 / (2 ** bits - 1))


class _IntLayer(nn.Module):
    """What IntLinear and IntConv share: the layer as its file holds it (`layout`, JSON; the STATE tensors as
    buffers) and the constants derived from it. Build with `pack` or `from_state`."""

    def __init__(self, layout, tensors):
        super().__init__()
        L, self.layout, self.t_idx, self.acts = layout, layout, 0, layout["acts"]
        self.shift = [0 if a is None or a["sym"] else 2 ** (a["bits"] - 1) for a in self.acts]  # code offsets
        O, segs, self.taps = L["out"], L["segments"], L["kernel"][0] * L["kernel"][1] if "kernel" in L else 1
        edges = [0] + [sum(segs[:j + 1]) for j in range(len(segs))]
        self.cbounds = list(zip(edges, edges[1:]))                                 # channel ranges
        self.bounds = [(c0 * self.taps, c1 * self.taps) for c0, c1 in self.cbounds]   # weight column ranges
        K, S, T = edges[-1] * self.taps, len(segs), tensors["a_delta"].shape[-1]
        codes = (torch.int8, [O, K]) if L["w_bits"] > 4 else (torch.uint8, [(O * K + 1) // 2])
        want = dict(codes=codes, w_zero=(torch.int32, [O, S])) | {k: (torch.float32, n) for k, n in dict(
            w_scale=[O, S], a_delta=[S, T], a_zero=[S, T], bias=[O], pre_scale=[edges[-1]]).items()}
        for name in STATE:
            if (t := tensors.get(name)) is None and (name not in ("bias", "pre_scale") or L[name]):
                raise ValueError(f"tensor {name!r} is missing")
            if t is not None and (t.dtype, list(t.shape)) != want[name]:
                raise ValueError(f"{name} is {t.dtype} {list(t.shape)}, the layout needs {want[name]}")
            self.register_buffer(name, t)
        qw = self.weight_codes()
        self.zw_used = [bool(self.w_zero[:, j].any()) for j in range(S)]
        colcorr = torch.stack([(k1 - k0) * self.w_zero[:, j] - qw[:, k0:k1].sum(1, dtype=torch.int32)
                               for j, (k0, k1) in enumerate(self.bounds)])            # [S, O]
        za = torch.stack([self.a_zero[j] - self.shift[j] for j in range(S)])         # [S, T], shifted
        self.register_buffer("colcorr", colcorr, persistent=False)
        self.register_buffer("zbias", (za.long()[:, :, None] * colcorr[:, None]).int(), persistent=False)
        self.register_buffer("scale", self.a_delta.double()[:, :, None] * self.w_scale.double().t()[:, None],
                             persistent=False)          # [S, T, O]: s_a s_w, float64 (exact), cast in use

    @classmethod
    def from_state(cls, layout, tensors):
        return cls(layout, tensors)

    @property
    def kind(self):
        """How this layer runs, for a "which layers ran how" table."""
        acts, wb, S = [a for a in self.acts if a], self.layout["w_bits"], len(self.acts)
        if not acts:
            return f"float (input not quantized), W{wb} dequantized"
        kinds = "/".join(sorted({a["kind"] for a in acts}))
        return (f"int8 _int_mm W{wb}A{max(a['bits'] for a in acts)} {kinds}"
                + (f", {S} segments" if S > 1 else "") + (", some float" if len(acts) < S else ""))

    def weight_codes(self):
        """int8 [O, K]: the stored codes (channel-major columns), unpacked when 4 bits or fewer."""
        O, K = self.layout["out"], self.bounds[-1][1]
        return self.codes if self.layout["w_bits"] > 4 else unpack_int4(self.codes, O * K).view(O, K)

    def weight_hat(self):
        """The dequantized weight [O, K]: s_w[o, j] (c[o, k] − z_w[o, j]) on segment j's columns."""
        n = torch.tensor([k1 - k0 for k0, k1 in self.bounds], device=self.codes.device)
        exp = lambda t: torch.repeat_interleave(t, n, dim=1)  # noqa: E731  [O, S] -> [O, K]
        return (self.weight_codes() - exp(self.w_zero)).to(self.w_scale.dtype) * exp(self.w_scale)

    def gemm_weights(self):
        """Per segment the int8 [O (+1), K_j] matrix of the GEMM: columns in im2col's tap-major order, and a
        last row of ones when z_w ≠ 0, whose output is Σ_k a[m, k]. Rebuilt at each forward (a copy of the
        weights: cheap against a batch's activations, not at batch 1)."""
        qw, O, mats = self.weight_codes(), self.layout["out"], []
        for j, ((c0, c1), (k0, k1)) in enumerate(zip(self.cbounds, self.bounds)):
            w = qw[:, k0:k1].reshape(O, c1 - c0, self.taps).transpose(1, 2).reshape(O, -1)
            mats.append(torch.cat([w, w.new_ones(1, k1 - k0)]) if self.zw_used[j] else w)
        return mats

    def _row(self):
        """The static tables' rows, LongTensor [B] (t_idx per sample) or [1] (an int t_idx; T = 1: row 0)."""
        t = self.t_idx if self.a_delta.shape[1] > 1 else 0
        return torch.as_tensor(t, device=self.a_delta.device).view(-1)

    def _quantize(self, j, xs, r, out=None):
        """Segment j's input xs (static: [B, ...] at rows r [B or 1]; dynamic: tokens [M, K_j]) -> (int8
        codes, z_a and s_a [M, 1] when dynamic, else None)."""
        a = self.acts[j]
        if a["kind"] == "dynamic":
            s, z = dynamic_params(xs, a["bits"], a["sym"], a["include_zero"])
            return act_codes(xs, s, z, a["bits"], a["sym"]), z - self.shift[j], s
        shape = (-1,) + (1,) * (xs.dim() - 1)
        delta, zero = self.a_delta[j, r].reshape(shape), self.a_zero[j, r].reshape(shape)
        return act_codes(xs, delta, zero, a["bits"], a["sym"], out=out, recip=a["recip"]), None, None

    def _int_segment(self, j, qa, za, sa, *, w, r, bias):
        """Segment j's dequantized contribution [B, P, O] (+ bias) from its codes qa [B·P, K_j], B the length
        of r (static rows) or of z_a (dynamic: P = 1); the arithmetic of the module docstring."""
        O = self.layout["out"]
        acc = int_mm(qa, w.t())                                         # [B·P, O (+1)]
        if self.zw_used[j]:                                             # − z_w Σ_k a, in place
            acc = acc[:, :O].addcmul_(acc[:, O:], self.w_zero[:, j], value=-1)
        B = len(r) if za is None else len(za)
        acc = acc.view(B, -1, O)
        if za is None:                                                  # static: the tables at rows r
            zb, sc = self.zbias[j, r][:, None], self.scale[j, r][:, None].to(self.a_delta.dtype)
        else:                                                           # dynamic: z_a (K_j z_w − Σ_k w)
            zb, sc = za.view(B, -1, 1).int() * self.colcorr[j], sa.view(B, -1, 1) * self.w_scale[:, j]
        y = acc.add_(zb).to(sc.dtype)
        return y.mul_(sc) if bias is None else torch.addcmul(bias, y, sc, out=y)


def _act_spec(a, j, T, conv):
    """A segment's quantizer spec for the layout (JSON), checked, and its static table (Δ [T], z [T])."""
    if a is None:
        return None, torch.ones(T), torch.zeros(T)
    if a["kind"] not in ("static", "dynamic") or a["kind"] == "dynamic" and conv:
        raise ValueError(f"activation kind {a['kind']!r}: static, dynamic (IntLinear only) or None")
    spec = dict(kind=a["kind"], bits=int(a["bits"]), sym=bool(a.get("sym", False)))
    if a["kind"] == "dynamic":
        return spec | dict(include_zero=bool(a.get("include_zero"))), torch.ones(T), torch.zeros(T)
    d, z = a["delta"].detach().reshape(-1).float().cpu(), a["zero"].detach().reshape(-1).float().cpu()
    (lo, hi), spec["recip"] = qrange(spec["bits"], spec["sym"]), bool(a.get("recip", False))
    if len(d) != T or z.shape != d.shape or (z != z.round()).any() or z.min() < lo or z.max() > hi:
        raise ValueError(f"segment {j}: static tables need {T} rows, integer zeros in [{lo}, {hi}]")
    return spec, d, z


def _pack(w2d, w_delta, w_zero, *, w_bits, w_sym, segments, acts, bias, pre_scale, layout):
    """The layout and tensors of a layer from its fake-quantized weight w2d [O, K] and its grid [O, S]:
    codes c = round(ŵ/Δ) + z, checked to lie on the grid and to give back ŵ."""
    (O, K), segs = w2d.shape, list(segments or [layout["in"]])
    taps = K // sum(segs)
    if taps * sum(segs) != K or not 2 <= w_bits <= 8:
        raise ValueError(f"segments {segs} do not cover the {K} weight columns, or bits {w_bits} not in 2..8")
    delta, zero = w_delta.detach().reshape(O, -1).float(), w_zero.detach().reshape(O, -1).float()
    if delta.shape[1] != len(segs):
        raise ValueError(f"the weight grid has {delta.shape[1]} columns per output, not {len(segs)} segments")
    n = torch.tensor([m * taps for m in segs], device=w2d.device)
    de, ze, w2d = delta.repeat_interleave(n, 1), zero.repeat_interleave(n, 1), w2d.detach().float()
    c = torch.round(w2d / de) + ze                                      # the codes, as fake_quant made them
    (qmin, qmax), shift = qrange(w_bits, w_sym), 0 if w_sym else 2 ** (w_bits - 1)
    err = ((c - ze) * de - w2d).abs().max()
    if c.min() < qmin or c.max() > qmax or (zero != zero.round()).any() or err > 1e-6 * w2d.abs().max():
        raise ValueError(f"the weight is not on its {w_bits}-bit grid (reconstruction error {err:.3g})")
    acts = list(acts) if isinstance(acts, (list, tuple)) else [acts] * len(segs)
    if len(acts) != len(segs):
        raise ValueError(f"{len(acts)} activation quantizers for {len(segs)} segments")
    T = max([a["delta"].numel() for a in acts if a and a["kind"] == "static"] or [1])
    specs, a_delta, a_zero = zip(*[_act_spec(a, j, T, "kernel" in layout) for j, a in enumerate(acts)])
    codes = (c - shift).to(torch.int8)
    tensors = dict(codes=codes if w_bits > 4 else pack_int4(codes), w_scale=delta,
                   w_zero=(zero - shift).int())
    tensors |= dict(a_delta=torch.stack(a_delta).to(w2d.device), a_zero=torch.stack(a_zero).to(w2d.device))
    tensors |= {} if bias is None else dict(bias=bias.detach().float())
    tensors |= {} if pre_scale is None else dict(pre_scale=pre_scale.detach().float().reshape(-1))
    layout |= dict(out=O, segments=segs, w_bits=w_bits, w_sym=bool(w_sym), acts=list(specs),
                   bias=bias is not None, pre_scale=pre_scale is not None)
    return layout, tensors


class IntLinear(_IntLayer):
    """A quantized nn.Linear on integer codes: x [..., K] -> [..., O]; with per-sample static rows the
    leading dim of x is the batch."""

    @classmethod
    def pack(cls, w_hat, w_delta, w_zero, *, w_bits, w_sym, segments, acts, bias, pre_scale=None):
        """From the fake-quantized weight w_hat [O, K] and its grid (Δ, z) [O, S]; segments: input channels
        per segment (None: one); acts: one quantizer spec or one per segment: None, dict(kind="static", bits,
        delta [T], zero [T], sym=False, recip=False) or dict(kind="dynamic", bits, sym, include_zero);
        pre_scale [K]."""
        layout = {"class": "IntLinear", "in": w_hat.shape[1]}
        return cls(*_pack(w_hat, w_delta, w_zero, w_bits=w_bits, w_sym=w_sym, segments=segments, acts=acts,
                          bias=bias, pre_scale=pre_scale, layout=layout))

    def forward(self, x):
        K, O = self.layout["in"], self.layout["out"]
        lead, B = x.shape[:-1], x.shape[0] if x.dim() > 1 else 1
        x = x.reshape(B, -1, K)                                         # [B, P, K]
        x = x if self.pre_scale is None else x * self.pre_scale
        r, ws, y = self._row(), self.gemm_weights() if any(self.acts) else None, None
        for j, ((c0, c1), a) in enumerate(zip(self.cbounds, self.acts)):
            xs, bias = x[..., c0:c1], self.bias if j == 0 else None
            if a is None:
                yj = F.linear(xs, self.weight_hat()[:, c0:c1], bias)
            else:
                qa, za, sa = self._quantize(j, xs.reshape(-1, c1 - c0) if a["kind"] == "dynamic" else xs, r)
                yj = self._int_segment(j, qa.reshape(-1, c1 - c0), za, sa, w=ws[j], r=r, bias=bias)
            y = yj if y is None else y.add_(yj.view(y.shape))
        return y.reshape(*lead, O)


class IntConv(_IntLayer):
    """A quantized nn.Conv2d (any kernel, stride, padding, dilation; groups 1) or nn.Conv1d (as a 1 × k
    Conv2d) on integer codes, channels-last inside: each segment's input is quantized once per element into a
    padded [B, H + 2p, W + 2p, C_j] int8 buffer whose border holds the code of 0.0 (z_a, not 0: the float
    conv's zero padding); then im2col, GEMM and dequantization run on chunks of images (CHUNK bytes of
    columns), whose temporaries stay in cache and below glibc's 32 MB mmap threshold, instead of batch-sized
    ones paged in afresh at every call. The output is a channels-last [B, O, Ho, Wo] tensor."""

    @classmethod
    def pack(cls, w_hat, w_delta, w_zero, *, w_bits, w_sym, segments, acts, bias, stride=1, padding=0,
             dilation=1, pre_scale=None):
        """IntLinear.pack's arguments, w_hat [O, C, kh, kw] (Conv1d: [O, C, k]), and the conv's geometry."""
        conv1d = w_hat.dim() == 3

        def pair(v, one):  # Conv1d's k -> (1, k); an int -> (v, v)
            v = list(v) if isinstance(v, (tuple, list, torch.Size)) else [v] * (1 if conv1d else 2)
            return [one] + v if conv1d else v
        if isinstance(padding, str):
            raise ValueError(f"padding {padding!r}: give the numbers")
        layout = {"class": "IntConv", "in": w_hat.shape[1]} | dict(
            kernel=pair(w_hat.shape[2:], 1), stride=pair(stride, 1), padding=pair(padding, 0),
            dilation=pair(dilation, 1), conv1d=conv1d)
        return cls(*_pack(w_hat.reshape(len(w_hat), -1), w_delta, w_zero, w_bits=w_bits, w_sym=w_sym,
                          segments=segments, acts=acts, bias=bias, pre_scale=pre_scale, layout=layout))

    def forward(self, x):
        L, O = self.layout, self.layout["out"]
        (ph, pw), stride, dil, kernel = L["padding"], L["stride"], L["dilation"], L["kernel"]
        x = x.unsqueeze(2) if L["conv1d"] else x                        # Conv1d: [B, C, 1, L]
        x = x if self.pre_scale is None else x * self.pre_scale.view(1, -1, 1, 1)
        (B, _, H, W), r, ws = x.shape, self._row(), self.gemm_weights() if any(self.acts) else None
        Ho, Wo = [(n + 2 * p - d * (k - 1) - 1) // s + 1
                  for n, p, d, k, s in zip((H, W), (ph, pw), dil, kernel, stride)]
        y = x.new_empty(B, Ho * Wo, O)
        for j, ((c0, c1), (k0, k1), a) in enumerate(zip(self.cbounds, self.bounds, self.acts)):
            xs, bias = x[:, c0:c1], self.bias if j == 0 else None
            if a is None:
                yj = F.conv2d(xs, self.weight_hat()[:, k0:k1].reshape(O, c1 - c0, *kernel), bias, stride,
                              (ph, pw), dil)
                yj = yj.permute(0, 2, 3, 1).reshape(B, -1, O)
                y = y.copy_(yj) if j == 0 else y.add_(yj)
                continue
            buf = torch.empty(B, H + 2 * ph, W + 2 * pw, c1 - c0, dtype=torch.int8, device=x.device)
            zc = (self.a_zero[j, r] - self.shift[j]).to(torch.int8).reshape(-1, 1, 1, 1)  # code of 0.0
            for edge in (buf[:, :ph], buf[:, H + ph:], buf[:, :, :pw], buf[:, :, W + pw:]):
                edge.copy_(zc.expand_as(edge))
            self._quantize(j, xs, r, out=buf[:, ph:ph + H, pw:pw + W].permute(0, 3, 1, 2))
            n = max(1, CHUNK // (Ho * Wo * (k1 - k0)))                    # images per GEMM
            for b in range(0, B, n):
                yj = self._int_segment(j, im2col(buf[b:b + n], kernel, stride, dil)[0], None, None, w=ws[j],
                                       r=r[b:b + n] if len(r) > 1 else r, bias=bias).view(-1, Ho * Wo, O)
                y[b:b + n] = yj if j == 0 else y[b:b + n].add_(yj)
        y = y.view(B, Ho, Wo, O).permute(0, 3, 1, 2)
        return y.squeeze(2) if L["conv1d"] else y


def from_quant_layer(m):
    """IntLinear / IntConv from a common.QuantLinear / QuantConv2d whose wq is a per-output-channel Quantizer
    (quant_w on) and whose aq a per-tensor static Quantizer (or quant_a off: the input stays float)."""
    wq, aq, groups = m.wq, m.aq, getattr(m, "conv_args", [1] * 4)[3]
    if not (m.quant_w and isinstance(wq, Quantizer) and wq.granularity == "channel" and groups == 1):
        raise ValueError("from_quant_layer needs quant_w on, a per-channel common.Quantizer as wq, groups 1")
    acts = None
    if m.quant_a:
        if not (isinstance(aq, Quantizer) and aq.granularity == "tensor"):
            raise ValueError("from_quant_layer needs a per-tensor common.Quantizer as aq (or quant_a off)")
        acts = dict(kind="static", bits=aq.bits, sym=aq.symmetric, delta=aq.delta, zero=aq.zero)
    args = dict(w_bits=wq.bits, w_sym=wq.symmetric, segments=None, acts=acts, bias=m.bias)
    with torch.no_grad():
        w_hat = wq(m.weight)
    if isinstance(m, QuantLinear):
        return IntLinear.pack(w_hat, wq.delta, wq.zero, **args)
    stride, padding, dilation, _ = m.conv_args
    return IntConv.pack(w_hat, wq.delta, wq.zero, stride=stride, padding=padding, dilation=dilation, **args)


@torch.no_grad()
def minmax_model(net, w_bits, a_bits, *inputs):
    """A copy of net with each Conv2d/Linear a common.QuantConv2d/QuantLinear that from_quant_layer takes:
    per-channel min-max weights, per-tensor static inputs with the min-max of one FP forward net(*inputs)."""
    def make(name, layer):
        wq = Quantizer(w_bits, "channel")
        wq.set_range(*minmax_range(wq.rows(layer.weight)))
        wrap = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        return wrap.from_float(layer, wq, Quantizer(a_bits))
    q = replace_modules(copy.deepcopy(net), lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear)), make)
    calib = lambda m, a: m.aq.set_range(a[0].min().view(1, 1), a[0].max().view(1, 1))  # noqa: E731
    hooks = [m.register_forward_pre_hook(calib) for m in q.modules() if isinstance(m, QUANT)]
    q(*inputs)
    for h in hooks:
        h.remove()
    set_quant(q, True, True)
    return q


def packed_model(q):
    """A copy of q with every QuantLinear/QuantConv2d replaced by from_quant_layer's integer layer."""
    return replace_modules(copy.deepcopy(q), lambda _, m: isinstance(m, QUANT),
                           lambda _, m: from_quant_layer(m))


# -----------------------------------------------------------------------------
# The file: safetensors, tensor "<layer>.<name>" for each name in STATE, the layouts in __metadata__["intq"]

def int_state(module):
    """(layout, {name: tensor}) of an IntLinear / IntConv: what from_state takes back."""
    return module.layout, {k: v for k, v in module.state_dict().items() if k in STATE}


def packed_bytes(module):
    """Bytes a layer keeps: codes, scales, zero points, bias, pre-scale and activation tables."""
    return sum(t.nbytes for t in int_state(module)[1].values())


def save_packed(path, modules, extra_tensors=None, header=None):
    """Write {name: IntLinear | IntConv}, extra tensors (the model's other parameters) and a JSON header.
    Returns dict(packed_bytes: the layers' tensors, extra_bytes, file_bytes)."""
    tensors, layers, extra = {}, {}, dict(extra_tensors or {})
    for name, m in modules.items():
        layers[name], state = int_state(m)
        tensors |= {f"{name}.{k}": v for k, v in state.items()}
    if clash := set(tensors) & set(extra):
        raise ValueError(f"extra tensors collide with packed layers: {sorted(clash)[:3]}")
    info = dict(format=FORMAT, layers=layers, header=header or {})
    save_safetensors(tensors | extra, path, {"intq": json.dumps(info)})
    return dict(packed_bytes=sum(t.nbytes for t in tensors.values()),
                extra_bytes=sum(t.nbytes for t in extra.values()), file_bytes=os.path.getsize(path))


def load_packed(path):
    """(tensors, info) of a save_packed file, info = dict(format, layers: {name: layout}, header); a file that
    is not one raises UserError (a truncated one: common.read_safetensors's)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    tensors, meta = read_safetensors(path, metadata=True)
    try:
        info = json.loads(meta["intq"])
        assert info["format"] == FORMAT and isinstance(info["layers"], dict)
    except (KeyError, ValueError, AssertionError, TypeError):
        raise UserError(f"{path}: not a packed integer model (no readable {FORMAT} header)") from None
    return tensors, info


def rebuild(tensors, info, path="file"):
    """({name: IntLinear | IntConv}, {name: the other tensors}) from load_packed's answer."""
    modules, used = {}, set()
    for name, layout in info["layers"].items():
        own = {k: tensors[f"{name}.{k}"] for k in STATE if f"{name}.{k}" in tensors}
        try:
            modules[name] = {"IntLinear": IntLinear, "IntConv": IntConv}[layout["class"]](layout, own)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"{path}: layer {name} does not match its layout ({e})") from None
        used |= {f"{name}.{k}" for k in own}
    return modules, {k: v for k, v in tensors.items() if k not in used}


# -----------------------------------------------------------------------------
# A whole packed network: the float architecture with its quantized layers swapped for the integer ones

class TableQuant(nn.Module):
    """A float fake quantizer at a hook point (the attention matmul inputs): one (Δ, z) row per sampling step
    and head, [T, H], picked by t_idx as the methods' own quantizers do (DilateQuant's TPQ: x·(1/Δ), recip;
    EDA-DM's ActQuant: x/Δ, T = 1). Asymmetric grid [0, 2^b − 1]."""

    def __init__(self, delta, zero, bits, recip):
        super().__init__()
        self.bits, self.recip, self.t_idx = bits, recip, 0
        self.register_buffer("delta", delta)
        self.register_buffer("zero", zero)

    def forward(self, x):
        T, H = self.delta.shape
        idx = torch.as_tensor(self.t_idx if T > 1 else 0, device=x.device).view(-1)
        idx = idx.expand(x.shape[0] // H) if len(idx) == 1 else idx
        shape = (-1,) + (1,) * (x.dim() - 1)
        delta, zero = self.delta[idx].reshape(shape), self.zero[idx].reshape(shape)      # [B·H, 1, ...]
        x = x.mul(delta.reciprocal()) if self.recip else x.div(delta)
        return x.round_().add_(zero).clamp_(0, 2 ** self.bits - 1).sub_(zero).mul_(delta)


def architecture(model):
    """The float network of a model name (models/ddpm.py or models/dit.py CONFIGS), default-initialised."""
    from models import ddpm, dit
    if model in ddpm.CONFIGS:
        return ddpm.UNet(**ddpm.CONFIGS[model])
    if model in dit.CONFIGS:
        return dit.DiT(**dit.CONFIGS[model])
    raise UserError(f"model {model!r}: packed models exist for {', '.join([*ddpm.CONFIGS, *dit.CONFIGS])}")


def float_keys(net, layers, hooks):
    """The parameters and buffers of net that stay float: all but the packed layers' and the hooks'."""
    own = tuple(f"{n}." for n in [*layers, *hooks])
    return [k for k in net.state_dict() if not k.startswith(own)]


def set_module(net, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def load_int_model(path):
    """(network, header, eps_k or None) of a packed file (export_int.py): the float architecture, built on the
    meta device (no fp32 copy of the weights is ever made), its quantized layers IntLinear / IntConv,
    TableQuant at the quantized hooks, the float rest loaded strictly. Eval mode."""
    tensors, info = load_packed(path)
    header = info["header"]
    with torch.device("meta"):
        net = architecture(header.get("model"))
    modules, rest = rebuild(tensors, info, path)
    hooks = header.get("hooks", {})
    floats = float_keys(net, modules, hooks)
    for name, m in modules.items():
        set_module(net, name, m)
    for name, h in hooks.items():
        if h is not None:
            set_module(net, name, TableQuant(rest.pop(f"{name}.delta"), rest.pop(f"{name}.zero"), h["bits"],
                                             h["recip"]))
    eps_k = rest.pop("eps_k", None)
    missing, unexpected = sorted(set(floats) - set(rest)), sorted(set(rest) - set(floats))
    if missing or unexpected:
        raise UserError(f"{path}: its float tensors do not fit {header.get('model')} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    net.load_state_dict(rest, strict=False, assign=True)
    return net.eval().requires_grad_(False), header, eps_k


def set_step(net, i):
    """Every static table of the packed network at row i (a sampling step's index; per sample: [B])."""
    for m in net.modules():
        if isinstance(m, (_IntLayer, TableQuant)):
            m.t_idx = i
