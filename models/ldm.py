"""
The latent diffusion models (LDM) of Rombach, Blattmann, Lorenz, Esser & Ommer, "High-Resolution Image
Synthesis with Latent Diffusion Models" (CVPR 2022, arXiv 2112.10752; code CompVis/latent-diffusion @a506df5),
written from the architecture with the official module names, so that the three checkpoints the quantization
papers evaluate (LDM-4 ImageNet cin256-v2, LDM-4 LSUN-Bedroom, LDM-8 LSUN-Church) load with strict=True.

- `UNetModel`: ldm/modules/diffusionmodules/openaimodel.py `UNetModel` with legacy=True: ResBlocks with
  scale-shift norm and up/down resampling, `AttentionBlock` (QKVAttentionLegacy: heads split before q/k/v),
  `SpatialTransformer` of ldm/modules/attention.py (self- and cross-attention, GEGLU feed-forward).
- `FirstStageDecoder`: the decoding half of ldm/models/autoencoder.py (`VQModelInterface.decode`: nearest
  codebook entry, then `post_quant_conv` and the `Decoder` of ldm/modules/diffusionmodules/model.py;
  `AutoencoderKL.decode` without the codebook). `ClassEmbedder`: ldm/modules/encoders/modules.py.
- Identity hook points where quantizers attach, named as in models/ddpm.py: act_q, act_k, act_v, act_softmax
  on both attention kinds' matmul inputs, and shortcut_h / shortcut_skip on the two halves of
  cat([h, skip]) where an output ResBlock's `skip_connection` 1×1 conv reads it.
- `read_checkpoint`: PyTorch-Lightning `.ckpt` files read by a restricted unpickler that builds tensors
  and nothing else; `load_ldm` loads a model's UNet (EMA weights where the model samples from them),
  decoder, class embedder, `alphas_cumprod` and `scale_factor` strictly; the URLs are common.CHECKPOINTS.
- `python -m models.ldm --model ldm-lsun-church --ckpt FILE`: a grid of DDIM samples (the sampler and the
  guidance: models/__init__.py, `load_model`).

    unet, first_stage, cond_stage, alphas_cumprod, scale_factor = load_ldm("ldm-lsun-church")
"""
import codecs, collections, math, pickle, zipfile
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, fetch_checkpoint, load_strict, read_safetensors
from models.ddpm import AttnBlock, Normalize, Upsample  # Upsample: nearest ×2, 3×3 `conv`; UNet and decoder
from models.dit import timestep_embedding  # cos half, then sin half, f_k = 10000^(−k/half): util.py's as well

# First stages (models/first_stage_models/{vq-f4,kl-f8}/config.yaml): ddconfig, embed_dim, codebook size.
# VQ-f4: 64×64×3 latents, 8192 codes; KL-f8 (the SD VAE's decoder architecture): 32×32×4.
VQ_F4 = dict(ddconfig=dict(z_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2), embed_dim=3,
             n_embed=8192)
KL_F8 = dict(ddconfig=dict(z_channels=4, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2),
             embed_dim=4)
# The models' `model.params` (configs/latent-diffusion/cin256-v2.yaml, models/ldm/lsun_beds256/config.yaml,
# models/ldm/lsun_churches256/config.yaml). Latents are [C, H, W] for 256×256 images; T = 1000.
CONFIGS = {
    # LDM-4 ImageNet, 400.9 M UNet parameters; the class enters only through cross-attention (no
    # label_emb); class 1000 is the unconditional label of classifier-free guidance. No EMA (use_ema False).
    "ldm-cin256-v2": dict(
        unet=dict(image_size=64, in_channels=3, model_channels=192, out_channels=3, num_res_blocks=2,
                  attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 5), num_heads=1,
                  use_spatial_transformer=True, transformer_depth=1, context_dim=512),
        first_stage=VQ_F4, cond_stage=dict(n_classes=1001, embed_dim=512),
        latent=(3, 64, 64), linear_start=0.0015, linear_end=0.0195, use_ema=False, scale_by_std=False),
    # LDM-4 LSUN-Bedroom, 274.1 M, unconditional, 32-channel heads, samples from EMA weights.
    "ldm-lsun-bedroom": dict(
        unet=dict(image_size=64, in_channels=3, model_channels=224, out_channels=3, num_res_blocks=2,
                  attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 4), num_head_channels=32),
        first_stage=VQ_F4, cond_stage=None,
        latent=(3, 64, 64), linear_start=0.0015, linear_end=0.0195, use_ema=True, scale_by_std=False),
    # LDM-8 LSUN-Church, 295.0 M, unconditional, 8 heads at every width, scale-shift norm, ResBlock
    # up/down; EMA weights; the latent scale 1/std is a buffer of the checkpoint (scale_by_std).
    "ldm-lsun-church": dict(
        unet=dict(image_size=32, in_channels=4, model_channels=192, out_channels=4, num_res_blocks=2,
                  attention_resolutions=(1, 2, 4, 8), channel_mult=(1, 2, 2, 4, 4), num_heads=8,
                  use_scale_shift_norm=True, resblock_updown=True),
        first_stage=KL_F8, cond_stage=None,
        latent=(4, 32, 32), linear_start=0.0015, linear_end=0.0155, use_ema=True, scale_by_std=True),
}
def ldm_alphas_cumprod(linear_start, linear_end, T=1000):
    """ᾱ_t of LDM's "linear" schedule, β_t = linspace(√β_0, √β_T, T)² in float64
    (ldm/modules/diffusionmodules/util.py make_beta_schedule; diffusers calls it scaled_linear)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class GroupNorm32(nn.GroupNorm):
    """The UNet's GroupNorm (util.py normalization): GroupNorm32(32, C), eps 1e-5, computed in float32."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


# -----------------------------------------------------------------------------
# The UNet blocks (ldm/modules/diffusionmodules/openaimodel.py, ldm/modules/attention.py)

class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)                                           # [B, C, H/2, W/2]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, the time embedding added (or, with scale-shift, GN(h)·(1 + scale) + shift), then
    GroupNorm-SiLU-dropout-conv, plus the input through `skip_connection` (1×1 conv if the width changes).
    up/down: the in_layers' GN+SiLU run before the resampling (nearest ×2 / 2×2 average pool), applied to
    both paths. split > 0 marks an output block whose input is cat([h, skip]) with split = channels of h:
    skip_connection sees the halves through the hooks shortcut_h and shortcut_skip."""

    def __init__(self, channels, emb_channels, out_channels, *, use_scale_shift_norm=False, up=False,
                 down=False, split=0, dropout=0.0):
        super().__init__()
        self.use_scale_shift_norm, self.up, self.down, self.split = use_scale_shift_norm, up, down, split
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels  # (scale, shift) or a bias
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels else
                                nn.Conv2d(channels, out_channels, 1))
        if split:
            self.shortcut_h, self.shortcut_skip = nn.Identity(), nn.Identity()

    def resample(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, 2, 2)

    def forward(self, x, emb):
        if self.up or self.down:
            h = self.resample(self.in_layers[1](self.in_layers[0](x)))
            x = self.resample(x)
            h = self.in_layers[2](h)                                # [B, C_out, H', W']
        else:
            h = self.in_layers(x)                                   # [B, C_out, H, W]
        e = self.emb_layers(emb)[:, :, None, None]                  # [B, C_out or 2·C_out, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        if self.split:
            x = torch.cat([self.shortcut_h(x[:, :self.split]), self.shortcut_skip(x[:, self.split:])], dim=1)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions with qkv and proj_out as Conv1d. Legacy order
    (QKVAttentionLegacy): qkv rows are grouped per head, [q; k; v] of width d inside each; q and k are both
    scaled by d^(−1/4). Hooks act_q, act_k (the scaled q and k), act_softmax, act_v: the matmul inputs."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.act_q, self.act_k, self.act_v, self.act_softmax = (nn.Identity() for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)                                  # [B, C, T]
        qkv = self.qkv(self.norm(x))                                # [B, 3C, T]
        d = C // self.num_heads
        q, k, v = qkv.reshape(B * self.num_heads, 3 * d, H * W).split(d, dim=1)  # [B·heads, d, T] each
        scale = 1 / math.sqrt(math.sqrt(d))
        w = torch.einsum("bct,bcs->bts", self.act_q(q * scale), self.act_k(k * scale))  # [B·heads, T, T]
        w = self.act_softmax(torch.softmax(w.float(), dim=-1).type(w.dtype))
        a = torch.einsum("bts,bcs->bct", w, self.act_v(v))          # [B·heads, d, T]
        return (x + self.proj_out(a.reshape(B, C, H * W))).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, N, D] over context [B, M, D_c] (x itself when None): bias-free to_q/k/v,
    softmax(q kᵀ·d^(−1/2)) v with heads folded into the batch ('b n (h d) -> (b h) n d'), then to_out.0.
    Hooks act_q, act_k, act_softmax, act_v on the matmul inputs."""

    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, query_dim), nn.Dropout(0.0))
        self.act_q, self.act_k, self.act_v, self.act_softmax = (nn.Identity() for _ in range(4))

    def forward(self, x, context=None):
        context = x if context is None else context
        B, h = x.shape[0], self.heads

        def split_heads(t):                                         # [B, n, h·d] -> [B·h, n, d]
            return t.reshape(B, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(B * h, t.shape[1], -1)
        q, k, v = (split_heads(f(y)) for f, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        sim = torch.einsum("b i d, b j d -> b i j", self.act_q(q), self.act_k(k)) * self.scale  # [B·h, N, M]
        attn = self.act_softmax(sim.softmax(dim=-1))
        out = torch.einsum("b i j, b j d -> b i d", attn, self.act_v(v))  # [B·h, N, d]
        out = out.reshape(B, h, -1, out.shape[-1]).permute(0, 2, 1, 3).reshape(B, -1, h * out.shape[-1])
        return self.to_out(out)                                     # [B, N, D]


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)                                     # exact (erf) GELU


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual self-attention (attn1), cross-attention on the context (attn2), feed-forward
    ff.net = GEGLU to 4·dim, dropout, Linear; registered in the official order attn1, ff, attn2, norm1..3."""

    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, n_heads, d_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, context_dim or dim, n_heads, d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), 1×1 proj_in, the H·W positions as tokens through `depth` transformer blocks,
    1×1 proj_out, plus the input."""

    def __init__(self, in_channels, n_heads, d_head, *, depth=1, context_dim=None):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, n_heads, d_head, context_dim)
                                                 for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(B, h.shape[1], H * W).permute(0, 2, 1)        # [B, HW, inner]
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.permute(0, 2, 1).reshape(B, -1, H, W)) + x


class TimestepEmbedSequential(nn.Sequential):
    """Children in order; ResBlocks also get the time embedding, SpatialTransformers the context."""

    def forward(self, x, emb, context=None):
        for layer in self:
            x = (layer(x, emb) if isinstance(layer, ResBlock) else
                 layer(x, context) if isinstance(layer, SpatialTransformer) else layer(x))
        return x


class UNetModel(nn.Module):
    """The official UNetModel (openaimodel.py) with legacy=True, conv_resample=True, dims=2 and no label_emb.
    attention_resolutions are downsampling factors. Heads at width ch: ch // num_head_channels if that is
    set, else num_heads; head width ch // heads (legacy rule). Weights come from a checkpoint: the official
    zero-init of the output convs is not reproduced."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, *,
                 attention_resolutions, channel_mult=(1, 2, 4, 8), num_heads=-1, num_head_channels=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_spatial_transformer=False,
                 transformer_depth=1, context_dim=None, dropout=0.0):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise UserError("UNetModel: set num_heads or num_head_channels")
        if use_spatial_transformer != (context_dim is not None):
            raise UserError("UNetModel: context_dim goes with use_spatial_transformer, and only with it")
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        emb = 4 * model_channels
        res = dict(use_scale_shift_norm=use_scale_shift_norm, dropout=dropout)

        def attention(ch):
            heads = ch // num_head_channels if num_head_channels != -1 else num_heads
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, ch // heads, depth=transformer_depth,
                                          context_dim=context_dim)
            return AttentionBlock(ch, heads)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        chans, ch, ds = [model_channels], model_channels, 1         # skip widths; ds = downsampling factor
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels, **res)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, emb, ch, down=True, **res) if resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch, **res), attention(ch),
                                                    ResBlock(ch, emb, ch, **res))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mult * model_channels, split=ch, **res)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, up=True, **res) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None):
        """x: [B, C, H, W] latents, timesteps: [B] (or a scalar) of the 1000-step process, context:
        [B, M, D_c] for cross-attention (cin256-v2: the ClassEmbedder's [B, 1, 512]) -> ε [B, C_out, H, W]."""
        t = timesteps.expand(x.shape[0]) if timesteps.dim() == 0 else timesteps
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # [B, 4·mc]
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)  # [B, C_h + C_skip, H, W] in
        return self.out(h)


class ClassEmbedder(nn.Module):
    """Class labels [B] -> cross-attention context [B, 1, embed_dim] (ldm/modules/encoders/modules.py)."""

    def __init__(self, n_classes, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, y):
        return self.embedding(y[:, None])


class ClassConditional(nn.Module):
    """cin256-v2 as one network ε(x, t, y): the UNet reads the class embedder's context (class 1000: none)."""

    def __init__(self, unet, cond_stage):
        super().__init__()
        self.unet, self.cond_stage = unet, cond_stage

    def forward(self, x, t, y):
        return self.unet(x, t, self.cond_stage(y))


# -----------------------------------------------------------------------------
# The first stage's decoding half (ldm/modules/diffusionmodules/model.py Decoder, ldm/models/autoencoder.py)

def swish(x):  # model.py's nonlinearity as written there, x·sigmoid(x): F.silu rounds differently (~1e-6)
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GroupNorm(eps 1e-6)-SiLU-conv twice plus the input (1×1 nin_shortcut if the width changes)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1, self.conv1 = Normalize(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Decoder(nn.Module):
    """conv_in -> mid (ResnetBlock, single-head attention, ResnetBlock) -> up levels from the lowest
    resolution (`up.L−1` runs first, `up.0` last), num_res_blocks + 1 ResnetBlocks each, ×2 nearest + conv
    between levels -> GroupNorm, SiLU, conv_out. The up levels' attention (empty `up.i.attn` in VQ-f4 and
    KL-f8) is not written out. Other ddconfig keys (double_z, in_channels, dropout) concern the encoder."""

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, z_channels, attn_resolutions=(), **unused):
        super().__init__()
        if attn_resolutions:
            raise UserError("Decoder: attention in the up levels is not written out (none in VQ-f4, KL-f8)")
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(block_in, block_in), AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(block_in if j == 0 else ch * ch_mult[i], ch * ch_mult[i])
                                         for j in range(num_res_blocks + 1)])
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            self.up.insert(0, level)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)                          # [B, C, 2H, 2W]
        return self.conv_out(swish(self.norm_out(h)))              # [B, out_ch, f·h, f·w]


class FirstStageDecoder(nn.Module):
    """The decoder side of VQModelInterface (n_embed given) or AutoencoderKL: the checkpoint's `decoder.*`,
    `quantize.embedding.weight` (VQ) and `post_quant_conv.*`, in that (the official) order."""

    def __init__(self, ddconfig, embed_dim, n_embed=None):
        super().__init__()
        self.decoder = Decoder(**ddconfig)
        if n_embed:
            self.quantize = nn.Module()
            self.quantize.embedding = nn.Embedding(n_embed, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def forward(self, z):
        """z [B, embed_dim, h, w] (the diffusion latent divided by scale_factor) -> images [B, 3, f·h, f·w],
        about [-1, 1]. VQ: each latent vector is first snapped to its nearest codebook entry, by the distance
        ‖z‖² + ‖e‖² − 2 z·e of taming-transformers' VectorQuantizer2."""
        if hasattr(self, "quantize"):
            z = z.permute(0, 2, 3, 1)                               # [B, h, w, C]
            zf = z.reshape(-1, z.shape[-1])                         # [Bhw, C]
            e = self.quantize.embedding.weight                      # [n_embed, C]
            d = (zf ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
            zq = e[d.argmin(1)].reshape(z.shape)
            z = (z + (zq - z)).permute(0, 3, 1, 2)                  # the official straight-through form
        return self.decoder(self.post_quant_conv(z))


# -----------------------------------------------------------------------------
# Checkpoints: a restricted unpickler for the Lightning .ckpt files, strict loading (the download and the
# URLs: common.fetch_checkpoint, common.CHECKPOINTS)

STORAGES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
            "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
            "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
            "BoolStorage": torch.bool}
# Objects of these packages are bookkeeping in a training checkpoint (Lightning's callback states keyed by
# the ModelCheckpoint class, omegaconf hyper-parameters, numpy scores): they unpickle as inert stand-ins.
INERT_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "typing")


class Inert:
    """Stand-in for a pickled object that weights do not need: takes any arguments, state and items, keeps
    none, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass
    __setstate__ = __setitem__ = append = extend = __init__


def rebuild_tensor(storage, offset, size, stride, *unused):        # torch._utils._rebuild_tensor_v2
    return storage.as_strided(size, stride, offset)


# The only callables a checkpoint may name: tensor (and Parameter) rebuilding, storage types, containers, and
# _codecs.encode, with which pickle protocol 2 (torch.save's) writes bytes; protocol 2 uses Python 2 names.
SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
                ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): codecs.encode,
                **{(m, c.__name__): c for m in ("builtins", "__builtin__") for c in (set, frozenset)},
                **{("torch", name): dtype for name, dtype in STORAGES.items()}}  # a storage: its element type


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles data.pkl of torch.save's zip format: tensors, containers, and inert stand-ins for the
    packages above. Any other global (a callable that could run code) is refused."""

    def __init__(self, zf, prefix, path):
        super().__init__(zf.open(prefix + "data.pkl"))
        self.zf, self.prefix, self.path, self.storages = zf, prefix, path, {}

    def find_class(self, module, name):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        if module.split(".")[0] in INERT_PACKAGES:
            return type(name, (Inert,), {})
        raise UserError(f"{self.path}: refusing to unpickle {module}.{name} (not a tensor or a training "
                        "checkpoint's bookkeeping); only weights are read from a checkpoint")

    def persistent_load(self, pid):                                 # ("storage", dtype, key, location, numel)
        _, dtype, key, _, numel = pid
        if key not in self.storages:                                # tensors may share a storage
            data = bytearray(self.zf.read(f"{self.prefix}data/{key}"))
            if len(data) != numel * dtype.itemsize:
                raise UserError(f"{self.path}: storage {key} has {len(data)} bytes, expected "
                                f"{numel * dtype.itemsize} (truncated?); re-download it")
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_checkpoint(path):
    """{name: tensor} of a torch.save zip file (a Lightning .ckpt: its "state_dict"), read without running
    any pickled code, or of a .safetensors file."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            if pkl is None:
                raise zipfile.BadZipFile("no data.pkl")
            obj = RestrictedUnpickler(zf, pkl[:-len("data.pkl")], path).load()
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError,
            TypeError) as e:
        raise UserError(f"{path}: not a readable torch.save zip checkpoint, or truncated "
                        f"({type(e).__name__}: {str(e)[:80]}); re-download it") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: holds no state dict of tensors")
    return sd


def empty(cls, *args, **kwargs):
    """cls(*args, **kwargs) with uninitialised weights (built on the meta device): a checkpoint fills them."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    return module.to_empty(device="cpu")


class Decode(nn.Module):
    """Latents -> images: first_stage(z / scale_factor) (LatentDiffusion.decode_first_stage; VQ: snapped to
    the codebook first)."""

    def __init__(self, first_stage, scale_factor):
        super().__init__()
        self.first_stage, self.scale_factor = first_stage, scale_factor

    def forward(self, z):
        return self.first_stage(z / self.scale_factor)


class LDM(NamedTuple):
    unet: UNetModel
    first_stage: FirstStageDecoder
    cond_stage: Optional[ClassEmbedder]                             # None for the unconditional models
    alphas_cumprod: torch.Tensor                                    # [1000] float32, the checkpoint's buffer
    scale_factor: float                                             # decode first_stage(z / scale_factor)


def from_state_dict(name, sd, what):
    """The LDM of CONFIGS[name] from a LatentDiffusion state dict (ldm/models/diffusion/ddpm.py), strictly:
    the UNet under `model.diffusion_model.` and, where the model samples from EMA, then the same names with
    the dots removed under `model_ema.diffusion_model` (ldm/modules/ema.py LitEma); the first stage under
    `first_stage_model.` (encoder and quant_conv ignored by name); the class embedder under
    `cond_stage_model.`; `alphas_cumprod` checked against the config's β range; `scale_factor`."""
    cfg = CONFIGS[name]
    unet = load_strict(empty(UNetModel, **cfg["unet"]), sub(sd, "model.diffusion_model."),
                       f"{what} ({name})")
    if cfg["use_ema"]:
        ema = {k: sd.get("model_ema.diffusion_model" + k.replace(".", "")) for k in unet.state_dict()}
        missing = [k for k, v in ema.items() if v is None]
        if missing:
            raise UserError(f"{what}: {len(missing)} of {len(ema)} EMA weights missing (e.g. model_ema."
                            f"diffusion_model{missing[0].replace('.', '')}); {name} samples from its EMA: "
                            "give the original checkpoint")
        load_strict(unet, ema, f"{what} (EMA of {name})")
    first = {k: v for k, v in sub(sd, "first_stage_model.").items()
             if not k.startswith(("encoder.", "quant_conv."))}
    first_stage = load_strict(empty(FirstStageDecoder, **cfg["first_stage"]), first, f"{what} (first stage)")
    cond = None
    if cfg["cond_stage"]:
        cond = load_strict(empty(ClassEmbedder, **cfg["cond_stage"]), sub(sd, "cond_stage_model."),
                           f"{what} (class embedder)").eval()
    expected = ldm_alphas_cumprod(cfg["linear_start"], cfg["linear_end"])
    ac = sd.get("alphas_cumprod")
    if ac is None or ac.shape != expected.shape or (ac.double() - expected).abs().max() > 1e-6:
        raise UserError(f"{what}: alphas_cumprod {'missing' if ac is None else 'of another schedule'}, "
                        f"not {name}'s β {cfg['linear_start']}..{cfg['linear_end']}: a wrong checkpoint")
    if cfg["scale_by_std"] and "scale_factor" not in sd:
        raise UserError(f"{what}: no scale_factor buffer, which {name} keeps in its checkpoint")
    return LDM(unet.eval(), first_stage.eval(), cond, ac, float(sd.get("scale_factor", 1.0)))


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_ldm(name, ckpt=None):
    """LDM(unet, first_stage, cond_stage, alphas_cumprod, scale_factor) of CONFIGS[name], with the weights
    of `ckpt` (a path, e.g. --ckpt FILE, or a common.CHECKPOINTS name; default: the model's own), in eval
    mode."""
    if name not in CONFIGS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}")
    path = fetch_checkpoint(ckpt or name)
    return from_state_dict(name, read_checkpoint(path), path)


# -----------------------------------------------------------------------------
# Sampling a grid from the command line:  python -m models.ldm --model ldm-lsun-church --ckpt FILE

@dataclass
class SampleConfig:
    """DDIM samples of an LDM checkpoint as a PNG grid (the papers' sampler settings by default)."""
    model: str = "ldm-lsun-church"  # ldm-cin256-v2, ldm-lsun-bedroom or ldm-lsun-church
    ckpt: str = ""                 # the model's .ckpt (default: its download, cached)
    n: int = 4                     # images (cin256-v2: image i of class i mod 1000)
    steps: int = 20                # DDIM steps
    eta: float = 0.0               # DDIM η (0: deterministic)
    cfg_scale: float = 1.0         # classifier-free guidance scale (cin256-v2; 1: none)
    batch: int = 4                 # images per forward
    seed: int = 0                  # image i's x_T and η noise: a generator seeded by (seed, i)
    device: str = "auto"           # auto, cpu or cuda
    out: str = "ldm_grid.png"      # a PNG grid, or .npz: uint8 [N, H, W, 3] under arr_0


SAMPLE_PRESETS = {"ldm-cin256-v2": dict(cfg_scale=3.0), "ldm-lsun-bedroom": dict(eta=1.0),
                  "ldm-lsun-church": {}}


@torch.no_grad()
def main():
    """One process, or one of WORLD_SIZE under torchrun (models.sample_sharded): the same images either way
    (image i: noise from a generator seeded by (seed, i), class i mod 1000 for cin256-v2)."""
    from common import parse_config, seed_everything
    from models import distributed, load_model, sample_sharded, save_images
    cfg = parse_config(SampleConfig, SAMPLE_PRESETS)
    if cfg.n < 1 or cfg.batch < 1 or not 1 <= cfg.steps <= 1000 or cfg.eta < 0:
        raise UserError("need --n >= 1, --batch >= 1, 1 <= --steps <= 1000, --eta >= 0")
    if not cfg.out.endswith((".png", ".npz")):
        raise UserError(f"--out {cfg.out}: a .png grid or an .npz (uint8 arr_0)")
    d = load_model(cfg.model, cfg.ckpt or None, cfg_scale=cfg.cfg_scale)
    _, world, device = distributed(cfg.device)
    seed_everything(cfg.seed)
    net, decode, seq = d.net.to(device), d.decode.to(device), d.timesteps(cfg.steps)

    def sample(x, gens, idx):
        y = None if not d.classes else torch.tensor(idx) % d.classes
        z = d.sample(d.eps(net, y, cfg.cfg_scale), x.to(device), seq, eta=cfg.eta, generator=gens)
        return decode(z)
    images = sample_sharded(sample, cfg.n, d.shape, seed=cfg.seed, batch=cfg.batch)
    if save_images(images, cfg.out):
        print(f"{cfg.n} samples of {cfg.model}, DDIM-{cfg.steps} η {cfg.eta}, CFG {cfg.cfg_scale}, {world} "
              f"process(es) -> {cfg.out}")


if __name__ == "__main__":
    from common import run_main
    run_main(main)
