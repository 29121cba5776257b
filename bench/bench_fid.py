"""
Images/second of FID feature extraction: eval_fid (ours) vs pytorch-fid's InceptionV3([3]), in the
same run, on the same machine, images, batch size and thread count. Not needed by the tests.

    # add --images 400 for steadier numbers
    python bench/bench_fid.py --ref-python /work/fidref/venv/bin/python

Both sides go from uint8 [N, 32, 32, 3] CIFAR-10 test images (../shared/assets) to mu and sigma; the
network resizes to 299x299 inside. Ours is eval_fid.statistics(); pytorch-fid's is the loop of its
get_activations() (ToTensor scaling, model(x)[0]) then np.mean/np.cov, without PNG decoding or
DataLoader workers, timed twice: on contiguous NCHW batches as its DataLoader gives them, and on the
channels-last batches ours gets (a permute of NHWC uint8), which oneDNN runs ~1.5x faster on CPU.
pytorch-fid is no dependency of the project: it runs in another Python (a venv with torch,
torchvision, pytorch-fid, scipy, pillow, tqdm) given by --ref-python, in a subprocess of this script
(--as-reference), with the weights of the cached FID Inception file put under pytorch-fid's names
(our module names are the same). Without --ref-python only ours is measured. Also printed: how far
the two sets of features and statistics are apart.
"""
import argparse, os, subprocess, sys, tempfile, time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_fid  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "assets",
                    "cifar10-fragment.npz")


def load_images(args):
    if not os.path.isfile(args.data):
        sys.exit(f"error: {args.data} not found; "
                 "pass --data with the CIFAR-10 fragment of the shared assets")
    return np.load(args.data)["test_images"][:args.images]          # N x 32 x 32 x 3 uint8


@torch.no_grad()
def run_pytorch_fid(args, images):
    """The reference side, run inside --ref-python: pytorch-fid's network and its activation loop."""
    import pytorch_fid.inception as ptfid
    sd = eval_fid.load_inception(args.inception).state_dict()
    sd.setdefault("fc.weight", torch.zeros(1008, 2048))             # the TorchScript file has no fc;
    sd.setdefault("fc.bias", torch.zeros(1008))                     # pool features do not use it
    ptfid.load_state_dict_from_url = lambda *a, **k: sd             # instead of the download
    model = ptfid.InceptionV3([3]).eval()                           # loads sd strictly
    model(torch.rand(10, 3, 32, 32))                                # warm-up
    seconds = {}
    for layout in ("contiguous", "channels_last"):
        t = time.perf_counter()
        feats = np.empty((len(images), 2048))
        for i in range(0, len(images), args.batch_size):
            # as ToTensor()
            x = torch.from_numpy(images[i:i + args.batch_size]).permute(0, 3, 1, 2).float() / 255
            x = x.contiguous() if layout == "contiguous" else x     # ToTensor + collate give contiguous NCHW
            feats[i:i + len(x)] = model(x)[0].squeeze(3).squeeze(2).numpy()
        mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
        seconds[layout] = time.perf_counter() - t
    return seconds, feats, mu, sigma


@torch.no_grad()
def run_ours(args, images):
    model = eval_fid.load_inception(args.inception)
    feats = []
    # for the comparison only
    model.register_forward_hook(lambda m, inp, out: feats.append(out.double().numpy()))
    eval_fid.statistics(images[:10], model, 10, progress=False)     # warm-up
    feats.clear()
    t = time.perf_counter()
    mu, sigma, _ = eval_fid.statistics(images, model, args.batch_size, progress=False)
    return time.perf_counter() - t, np.concatenate(feats), mu, sigma


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--ref-python",
                   help="a Python with pytorch-fid installed; without it pytorch-fid is skipped")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=DATA)
    p.add_argument("--inception", default=None, help="weights file (default: the cached one, as eval_fid)")
    p.add_argument("--as-reference", metavar="OUT.npz", help=argparse.SUPPRESS)   # the subprocess's mode
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = load_images(args)
    if args.as_reference:
        seconds, feats, mu, sigma = run_pytorch_fid(args, images)
        np.savez(args.as_reference, feats=feats, mu=mu, sigma=sigma,
                 **{f"seconds_{k}": v for k, v in seconds.items()})
        return
    print(f"{len(images)} images 32x32 -> 299x299, batch {args.batch_size}, {args.threads} threads, "
          f"torch {torch.__version__}")
    seconds, feats, mu, sigma = run_ours(args, images)
    print(f"ours, eval_fid.statistics(): {len(images) / seconds:6.2f} images/s  ({seconds:.1f} s)")
    if not args.ref_python:
        print("pytorch-fid: skipped (pass --ref-python PATH, a Python with pytorch-fid installed)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ref.npz")
        argv = [args.ref_python, os.path.abspath(__file__), "--as-reference", out,
                "--images", str(args.images), "--batch-size", str(args.batch_size),
                "--threads", str(args.threads), "--data", args.data]
        subprocess.run(argv + (["--inception", args.inception] if args.inception else []), check=True)
        ref = dict(np.load(out))
    for layout, how in (("contiguous", "NCHW batches, as its DataLoader gives them"),
                        ("channels_last", "the channels-last batches that ours gets")):
        s = float(ref[f"seconds_{layout}"])
        print(f"pytorch-fid InceptionV3([3]), {how}: {len(images) / s:6.2f} images/s  "
              f"({s:.1f} s; ours is {s / seconds:.2f}x)")
    rel = np.abs(feats - ref["feats"]).max(1) / np.abs(ref["feats"]).max(1)
    print(f"features: max |ours - theirs| / max |theirs| per image: {rel.max():.2e} "
          f"(median {np.median(rel):.2e})")
    print(f"mu: max abs diff {np.abs(mu - ref['mu']).max():.2e};  "
          f"sigma: max abs diff {np.abs(sigma - ref['sigma']).max():.2e}"
          f" (max |sigma| {np.abs(ref['sigma']).max():.2f})")


if __name__ == "__main__":
    main()
