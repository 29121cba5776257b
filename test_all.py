"""
Tests: known answers for the quantizers, the checkpoint reader/writer and the samplers, and
parity with the official implementations through committed fixtures (fixtures/README.md).

    python -m pytest -q test_all.py      # or: python test_all.py
"""
import json, os, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from common import (Quantizer, QuantConv2d, QuantLinear, UserError, ddim_sample, ddim_timesteps, fake_quant,
                    linear_alphas_cumprod, load_state_dict, lp_search_range, minmax_range, qrange, quant_params,
                    read_safetensors, replace_modules, save_safetensors, set_quant, to_rows)
from models.ddpm import UNet, from_diffusers

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
            in_channels=3, resolution=32)  # the official CIFAR-10 structure at 1/4 width


def minmax_quant(x, bits, granularity="channel", group_size=0, symmetric=False):
    q = Quantizer(bits, granularity, group_size, symmetric)
    q.set_range(*minmax_range(q.rows(x)))
    return q(x)


# -----------------------------------------------------------------------------
# Quantizer known answers

def test_8bit_close_to_identity_and_error_falls_with_bits():
    x = torch.randn(64, 32, 3, 3)
    delta = (x.reshape(64, -1).amax(1) - x.reshape(64, -1).amin(1).clamp(max=0)) / 255
    err8 = (minmax_quant(x, 8) - x).abs().reshape(64, -1).amax(1)
    assert torch.all(err8 <= delta / 2 + 1e-6)                      # rounding error only, no clipping
    mse = [(minmax_quant(x, b) - x).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(mse, mse[1:]))


def test_fake_quant_lands_on_grid_and_is_idempotent():
    x = torch.randn(8, 100)
    for symmetric in (False, True):
        q = Quantizer(4, "channel", symmetric=symmetric)
        q.set_range(*minmax_range(q.rows(x)))
        y = q(x)
        codes = y / q.delta + q.zero
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        qmin, qmax = qrange(4, symmetric)
        assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
        assert torch.equal(q(y), y)                                 # idempotent
        assert len(torch.unique(y[0])) <= 16


def test_group_layout():
    w = torch.randn(16, 64)
    # g = the whole row is per-output-channel quantization
    assert torch.equal(minmax_quant(w, 4, "group", 64), minmax_quant(w, 4, "channel"))
    # each group of 8 input channels is quantized on its own
    y = minmax_quant(w, 4, "group", 8)
    assert torch.equal(y[:, 8:16], minmax_quant(w[:, 8:16].contiguous(), 4, "channel"))
    assert to_rows(w, "group", 8).shape == (128, 8)
    with pytest.raises(UserError, match="does not divide"):
        to_rows(w, "group", 12)
    # dynamic per-token activations [B, N, d]: one range per token and group, taken at each call
    a = torch.randn(2, 5, 64)
    dq = Quantizer(8, "group", 64, dynamic=True)
    assert torch.equal(dq(a)[1, 3], minmax_quant(a[1, 3:4], 8, "channel")[0])


def test_ste_and_lsq_gradients():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 5.0], requires_grad=True)
    delta = torch.tensor(0.5, requires_grad=True)
    zero, (qmin, qmax) = torch.tensor(2.0), qrange(2, False)        # grid {-1, -0.5, 0, 0.5}
    y = fake_quant(x, delta, zero, qmin, qmax)
    assert torch.allclose(y.detach(), torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))  # STE inside, 0 where clipped
    v = x.detach() / 0.5                                            # LSQ: round(v) − v inside, qmin/qmax − z outside
    lsq = torch.where(v.round() + 2 < qmin, qmin - 2.0, torch.where(v.round() + 2 > qmax, qmax - 2.0, v.round() - v))
    assert torch.allclose(delta.grad, lsq.sum())


def test_quant_params_conventions():
    lo, hi = torch.tensor([[0.5]]), torch.tensor([[2.0]])
    d, z = quant_params(lo, hi, 8, include_zero=True)               # EDA-DM: range widened to [0, 2]
    assert torch.allclose(d, torch.tensor([[2 / 255]])) and z.item() == 0
    d, z = quant_params(lo, hi, 8, include_zero=False)              # Q-DiT: [0.5, 2], z clamps to 0
    assert torch.allclose(d, torch.tensor([[1.5 / 255]])) and z.item() == 0
    d, z = quant_params(torch.tensor([[-1.0]]), hi, 8, symmetric=True)
    assert torch.allclose(d, torch.tensor([[2 / 127]])) and z.item() == 0


def test_lp_search_clips_outliers_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(4, 1000)
    x[:, 0] = 40.0                                                  # one outlier per row
    rows = x.reshape(4, -1)
    lo, hi = lp_search_range(rows, 4, torch.arange(1, 101) / 100, symmetric_range=True)
    assert torch.all(hi < 40) and torch.all(lo > -40)
    lp = lambda r: (fake_quant(rows, *quant_params(*r, 4), 0, 15) - rows).abs().pow(2.4).mean(1)
    A = torch.maximum(-rows.amin(1, keepdim=True), rows.amax(1, keepdim=True))
    assert torch.all(lp((lo, hi)) < lp((-A, A)))                    # better than its unclipped α = 1 range
    lo2, hi2 = lp_search_range(rows, 4, 1 - 0.001 * torch.arange(100), symmetric_range=False, include_zero=False)
    assert torch.all(hi2 <= 40) and torch.all(hi2 >= 0.9 * 40)      # Q-DiT's grid shrinks by at most 9.9 %


# -----------------------------------------------------------------------------
# Wrappers

def test_wrappers_off_are_exact_and_on_are_close():
    torch.manual_seed(0)
    net = UNet(**TINY).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        ref = net(x, t)
        make = lambda name, m: (QuantLinear if isinstance(m, nn.Linear) else QuantConv2d).from_float(
            m, Quantizer(8, "channel"), Quantizer(8, "tensor", dynamic=True))
        replace_modules(net, lambda name, m: isinstance(m, (nn.Linear, nn.Conv2d)), make)
        n_wrapped = sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in net.modules())
        assert n_wrapped == sum(k.endswith(".weight") and v.dim() in (2, 4) for k, v in net.state_dict().items())
        assert torch.equal(net(x, t), ref)                          # quantization off: bit for bit
        for m in net.modules():
            if isinstance(m, (QuantLinear, QuantConv2d)):
                m.wq.set_range(*minmax_range(m.wq.rows(m.weight)))
        set_quant(net, weights=True, acts=False)
        w8 = net(x, t)
        set_quant(net, weights=True, acts=True)
        w8a8 = net(x, t)
    err = lambda y: ((y - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert 0 < err(w8) < 1e-3 and err(w8) < err(w8a8) < 1e-2


# -----------------------------------------------------------------------------
# Checkpoints

def test_safetensors_round_trip_and_written_by_hand(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.tensor(True), "f": torch.zeros(0)}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    # a file written by hand to the format: u64 header length, JSON header, raw little-endian data
    data = np.array([1.5, -2.0], dtype="<f4").tobytes() + np.array([7], dtype="<i8").tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "n": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]}}).encode()
    (tmp_path / "h.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data)
    h = read_safetensors(str(tmp_path / "h.safetensors"))
    assert h["w"].tolist() == [1.5, -2.0] and h["n"].item() == 7 and h["n"].shape == ()
    # truncated and garbage files are one-line errors
    (tmp_path / "t.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-3])
    for bad in ("t.safetensors", "h.txt"):
        (tmp_path / "h.txt").write_bytes(b"not a checkpoint at all")
        with pytest.raises(UserError):
            read_safetensors(str(tmp_path / bad))


def test_safetensors_reads_the_library_files():
    expected = np.load(os.path.join(FIX, "dtypes_expected.npz"))
    got = read_safetensors(os.path.join(FIX, "dtypes.safetensors"))
    assert set(got) == set(expected.files)
    for k in expected.files:
        assert got[k].shape == expected[k].shape
        half = got[k].dtype in (torch.float16, torch.bfloat16)     # the npz holds these upcast to float32
        assert np.array_equal(got[k].float().numpy() if half else got[k].numpy(), expected[k])


def test_load_state_dict_unwraps_and_rejects(tmp_path):
    sd = {"w": torch.ones(2)}
    for wrap in ("ema", "state_dict", "model", None):
        torch.save({wrap: sd} if wrap else sd, tmp_path / "c.ckpt")
        assert torch.equal(load_state_dict(str(tmp_path / "c.ckpt"))["w"], sd["w"])
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    for path in (tmp_path / "bad.pt", tmp_path / "missing.pt"):
        with pytest.raises(UserError):
            load_state_dict(str(path))
    with pytest.raises(UserError, match="missing keys"):
        common.load_strict(UNet(**TINY), sd, "c.ckpt")


# -----------------------------------------------------------------------------
# Samplers

def test_ddim_timestep_sequences():
    u = ddim_timesteps("uniform", 100)
    assert len(u) == 100 and u[0] == 0 and u[-1] == 990
    q = ddim_timesteps("quad", 100)
    assert len(q) == 100 and q[0] == 0 and q[-1] == 800 and len(set(q)) == 96
    assert q[:9] == [0, 0, 0, 0, 1, 2, 2, 3, 5] and q == sorted(q)
    e = ddim_timesteps("even", 50)
    assert len(e) == 50 and e[:3] == [0, 20, 41] and e[-1] == 999 and len(set(e)) == 50
    assert ddim_timesteps("even", 100)[-1] == 999


def test_ddim_known_answer_and_trajectory():
    """For data concentrated at one point c, ε(x_t) = (x_t − √ᾱ c)/√(1 − ᾱ) exactly, and DDIM (η = 0)
    must land on c from any start, also through the repeated steps of the quad sequence."""
    abar = linear_alphas_cumprod()
    c = torch.linspace(-0.9, 0.9, 12).reshape(1, 3, 2, 2)
    eps_fn = lambda x, t: (x - abar[t.long()].float().sqrt().view(-1, 1, 1, 1) * c) / \
        (1 - abar[t.long()].float()).sqrt().view(-1, 1, 1, 1)
    seq, seen = ddim_timesteps("quad", 100), []
    x0, traj = ddim_sample(eps_fn, torch.randn(4, 3, 2, 2), seq, abar, before_step=seen.append, trajectory=True)
    assert torch.allclose(x0, c.expand(4, -1, -1, -1), atol=1e-4)
    assert seen == list(range(99, -1, -1)) and [s for _, _, s in traj] == seen
    assert all(seq[i] == t for _, t, i in traj) and traj[0][0].shape == (4, 3, 2, 2)
    g = lambda: torch.Generator().manual_seed(1)
    a = ddim_sample(eps_fn, torch.randn(2, 3, 2, 2, generator=g()), seq, abar, eta=1.0, generator=g())
    assert torch.allclose(a, c.expand(2, -1, -1, -1), atol=1e-3)


# -----------------------------------------------------------------------------
# Parity with the official implementations (fixtures/README.md says how they were made)

@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_ddpm_parity_with_official_code(layout):
    io = read_safetensors(os.path.join(FIX, "ddpm_tiny_io.safetensors"))
    sd = load_state_dict(os.path.join(FIX, f"ddpm_tiny_{layout}.safetensors"))
    if layout == "diffusers":
        assert any(k.startswith("down_blocks.") for k in sd)
        sd = from_diffusers(sd)
    net = common.load_strict(UNet(**TINY), sd, layout).eval()
    with torch.no_grad():
        eps = net(io["x"], io["t"])
    ref = io[f"eps_{layout}"]
    assert (eps - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


# -----------------------------------------------------------------------------
# The bundled model (models/train.py)

ASSETS = os.path.join(HERE, "..", "shared", "assets")
needs_cifar = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "cifar10-fragment.npz")),
                                 reason="../shared/assets/cifar10-fragment.npz is absent (real CIFAR-10 is not shipped)")


@needs_cifar
def test_bundled_model_is_the_trained_one():
    """ε-MSE on noised real CIFAR-10 test images: the shipped weights must be far below an untrained UNet."""
    from models.ddpm import CONFIGS, load_unet
    with np.load(os.path.join(ASSETS, "cifar10-fragment.npz")) as z:
        x0 = torch.from_numpy(z["test_images"][:256]).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    t, eps = torch.randint(1000, (256,), generator=g), torch.randn(x0.shape, generator=g)
    a = linear_alphas_cumprod().float()[t].view(-1, 1, 1, 1)
    nets = load_unet("ddpm-cifar10-small"), UNet(**CONFIGS["ddpm-cifar10-small"]).eval()
    with torch.no_grad():
        trained, untrained = [(net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float()) - eps).pow(2).mean().item()
                              for net in nets]
    assert trained < 0.1 and untrained > 5 * trained, (trained, untrained)


# -----------------------------------------------------------------------------
# Command line: bad input is one line on stderr and exit code 2

def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def test_cli_bad_input_exit_2(tmp_path):
    whole = open(os.path.join(FIX, "ddpm_tiny_original.safetensors"), "rb").read()
    (tmp_path / "head.safetensors").write_bytes(whole[:5000])     # cut inside the JSON header
    (tmp_path / "tail.safetensors").write_bytes(whole[:-5000])    # cut inside the tensor data
    cases = {str(tmp_path / "nope.ckpt"): "no such file", str(tmp_path / "head.safetensors"): "truncated",
             str(tmp_path / "tail.safetensors"): "truncated",
             os.path.join(FIX, "dtypes.safetensors"): "missing keys", "no-such-model": "known checkpoint",
             os.path.join(FIX, "ddpm_tiny_original.safetensors"): "wrong shapes"}
    for ckpt, msg in cases.items():
        r = run_cli("-m", "models.ddpm", "--model", "ddpm-cifar10", "--ckpt", ckpt, "--n", "1", "--steps", "2",
                    "--out", str(tmp_path / "g.png"))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "g.png")
    r = run_cli("-m", "models.train", "--data", str(tmp_path / "none.npz"), "--workdir", str(tmp_path))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_parse_config_presets_and_help():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        """demo"""
        model: str = "small"   # which model
        steps: int = 100       # DDIM steps (Sec. 5)
        fast: bool = False     # go fast

    presets = {"small": dict(steps=10), "big": dict()}
    assert common.parse_config(Cfg, presets, []) == Cfg("small", 10, False)
    assert common.parse_config(Cfg, presets, ["--model", "big", "--fast"]) == Cfg("big", 100, True)
    assert common.parse_config(Cfg, presets, ["--steps", "5"]).steps == 5
    r = run_cli("-m", "models.ddpm", "--help")
    assert r.returncode == 0 and "DDIM steps" in r.stdout


def test_grid_and_record(tmp_path):
    x = torch.rand(10, 3, 8, 8) * 2 - 1
    common.save_grid(x, str(tmp_path / "g.png"), nrow=4)
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "g.png"))                 # [H, W, 3]
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(grid[2:10, 2:10], u8[0]) and np.array_equal(grid[12:20, 12:20], u8[5])
    rec = common.write_record(str(tmp_path / "r.json"), {"seed": 1}, {"fid": None}, 1.234, torch.device("cpu"))
    assert json.load(open(tmp_path / "r.json"))["metrics"] == {"fid": None} and rec["wall_seconds"] == 1.23


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
