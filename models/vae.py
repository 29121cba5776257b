"""
The decoder of the Stable Diffusion VAE (the KL-f8 autoencoder of Rombach et al., "High-Resolution
Image Synthesis with Latent Diffusion Models", CVPR 2022, arXiv 2112.10752), whose decoder-fine-tuned
versions stabilityai/sd-vae-ft-mse and sd-vae-ft-ema turn DiT's latents into images. Module names are
those of diffusers' AutoencoderKL (`post_quant_conv`, `decoder.conv_in`, `decoder.mid_block`,
`decoder.up_blocks.N`, `decoder.conv_norm_out`, `decoder.conv_out`), so the decoder half of
`diffusion_pytorch_model.safetensors` loads strictly; the encoder is not written out.

    images = load_vae("sd-vae-ft-mse").decode(z)     # z: [B, 4, h, w] -> [B, 3, 8h, 8w], about [-1, 1]
"""
import re

import torch.nn as nn
import torch.nn.functional as F

from common import UserError, fetch_checkpoint, load_state_dict, load_strict

SCALE = 0.18215  # latents were multiplied by this for training the diffusion model; decode divides it out
# The SD VAE (both fine-tuned decoders): 4 levels, 3 ResNet blocks a level on the way up,
# 49.5 M decoder parameters.
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
          out_channels=3)
CONFIGS = {"sd-vae-ft-mse": SD, "sd-vae-ft-ema": SD}  # weights: common.CHECKPOINTS under the same name


def Normalize(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv3×3 twice, plus the input (through a 1×1 `conv_shortcut` if the width changes).
    No time embedding: the VAE is not conditioned."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                              else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions with a GroupNorm in front and a residual;
    q, k, v and the output are Linears over channels (`to_out` is a list in diffusers: `to_out.0`)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = Normalize(channels, groups)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        w = (q @ k.transpose(1, 2) * C ** -0.5).softmax(dim=-1)    # [B, HW_q, HW_k]
        h = self.to_out[0](w @ v)                                   # [B, HW, C]
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Decoder(nn.Module):
    """conv_in -> mid block (ResNet, attention, ResNet) -> up blocks from the widest level down (each
    layers_per_block + 1 ResNets, then ×2 nearest upsampling and a conv, except the last) -> GroupNorm,
    SiLU, conv_out."""

    def __init__(self, block_out_channels, layers_per_block, norm_num_groups, latent_channels, out_channels):
        super().__init__()
        chans, g = list(reversed(block_out_channels)), norm_num_groups  # SD: 512, 512, 256, 128
        self.conv_in = nn.Conv2d(latent_channels, chans[0], 3, padding=1)
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([ResnetBlock2D(chans[0], chans[0], g) for _ in range(2)])
        self.mid_block.attentions = nn.ModuleList([Attention(chans[0], g)])
        self.up_blocks, c_in = nn.ModuleList(), chans[0]
        for i, c in enumerate(chans):
            block = nn.Module()
            block.resnets = nn.ModuleList([ResnetBlock2D(c_in if j == 0 else c, c, g)
                                           for j in range(layers_per_block + 1)])
            if i != len(chans) - 1:
                block.upsamplers = nn.ModuleList([Upsample2D(c)])
            self.up_blocks.append(block)
            c_in = c
        self.conv_norm_out = Normalize(chans[-1], g)
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)                                         # [B, 512, h, w]
        h = self.mid_block.resnets[0](h)
        h = self.mid_block.resnets[1](self.mid_block.attentions[0](h))
        for block in self.up_blocks:
            for resnet in block.resnets:
                h = resnet(h)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h)                          # h, w doubled; SD: 8h × 8w at the end
        return self.conv_out(F.silu(self.conv_norm_out(h)))       # [B, 3, 8h, 8w]


class VAEDecoder(nn.Module):
    """The decoding half of AutoencoderKL: post_quant_conv (1×1) and the Decoder."""

    def __init__(self, block_out_channels, layers_per_block, norm_num_groups, latent_channels, out_channels):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(block_out_channels, layers_per_block, norm_num_groups, latent_channels,
                               out_channels)

    def decode(self, z):
        """Diffusion latents z [B, 4, h, w] -> images [B, 3, 8h, 8w] in about [-1, 1], not clamped:
        DiT's sample.py calls vae.decode(z / 0.18215); uint8 is clamp(127.5·x + 128, 0, 255)."""
        return self.decoder(self.post_quant_conv(z / SCALE))

    forward = decode


# Older diffusers exports (the sd-vae-ft-* files among them) name the attention projections like this.
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def decoder_state_dict(sd):
    """The decoder half of an AutoencoderKL state dict, for load_strict: the keys under encoder. and
    quant_conv. are dropped by name (any other stray key is left for load_strict to reject), and old
    attention names are renamed to the new ones."""
    old = re.compile(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.")
    return {old.sub(lambda m: f".attentions.{m[1]}.{OLD_ATTENTION_NAMES[m[2]]}.", k): v
            for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))}


def load_vae(model="sd-vae-ft-mse", ckpt=None):
    """The VAE decoder of CONFIGS[model] with the weights of `ckpt` (a path or a CHECKPOINTS name;
    default: the model's own; Q-DiT decodes with ft-MSE, DiT's sample_ddp.py with ft-EMA), loaded
    strictly: every decoder and post_quant_conv tensor must be there with its shape. Eval mode."""
    if model not in CONFIGS:
        raise UserError(f"unknown VAE {model!r}; choose one of {', '.join(CONFIGS)}")
    path = fetch_checkpoint(ckpt or model)
    return load_strict(VAEDecoder(**CONFIGS[model]), decoder_state_dict(load_state_dict(path)), path).eval()
