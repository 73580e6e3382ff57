"""Sample quality of digit models: a Frechet distance in the feature space of a small digit classifier,
and that classifier's confidence on the samples.

The classifier (:class:`DigitClassifier`, shipped as ``fastddpm/assets/digits_classifier.safetensors``)
is a 3-conv CNN trained by :func:`train_classifier` on the ``train`` split of scikit-learn's digits at
16x16 in [-1, 1] (the split the diffusion model trains on), with random 1-pixel shifts; its 64-wide
penultimate layer (after ReLU) is the feature space. The Frechet distance (Heusel et al. 2017) compares
the Gaussians fitted to two feature sets:
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
The reference set is always the held-out ``test`` split (359 images), never seen by either network.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..train.data import digits_split

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "digits_classifier.safetensors")
FEATURES = 64


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 16, 16) in [-1, 1] -> (B, 64)
        if x.shape[1:] != (1, 16, 16):
            raise ValueError(f"images: expected (B, 1, 16, 16) in [-1, 1], got {tuple(x.shape)}")
        h = F.relu(self.c1(x))
        h = F.max_pool2d(F.relu(self.c2(h)), 2)  # (B, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.c3(h)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel each way (background -1 fills the border)."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    out = torch.empty_like(x)
    dx = torch.randint(0, 3, (x.shape[0],), generator=g)
    dy = torch.randint(0, 3, (x.shape[0],), generator=g)
    for i in range(x.shape[0]):
        out[i] = pad[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16]
    return out


def train_classifier(epochs: int = 30, seed: int = 0, log=print) -> tuple[DigitClassifier, float]:
    """Train on the digits train split; returns (model in eval mode, accuracy on the test split)."""
    x, y = digits_split("train", 16)
    xt, yt = digits_split("test", 16)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % 10 == 0:
            log(f"epoch {ep + 1}: loss {loss.item():.4f}, test accuracy {accuracy(model, xt, yt):.4f}")
    model.eval()
    return model, accuracy(model, xt, yt)


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def load_classifier(path: str | None = None) -> DigitClassifier:
    """The digit classifier from ``path`` (default: the shipped one). A path that is not a readable
    safetensors file of :class:`DigitClassifier` weights (a folder, another format, another network's
    weights) raises one-line ValueError / FileNotFoundError naming the path and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = path or ASSET
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; expected a digit classifier .safetensors file "
                         "(fastddpm eval --train-classifier writes one)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier: {path} is missing "
                                "(train it with fastddpm eval --train-classifier)")
    try:
        sd = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    model = DigitClassifier()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    reshaped = [k for k in want if k in got and got[k] != want[k]]
    ints = [k for k, v in sd.items() if not v.is_floating_point()]
    if missing or extra or reshaped or ints:
        detail = []
        if missing:
            detail.append(f"{len(missing)} tensors missing, e.g. {missing[0]!r}")
        if extra:
            detail.append(f"{len(extra)} unexpected, e.g. {extra[0]!r}")
        detail += [f"{k!r} is {got[k]}, expected {want[k]}" for k in reshaped[:1]]
        detail += [f"{k!r} is not floating point" for k in ints[:1]]
        detail = "; ".join(detail)
        raise ValueError(f"{path!r} is not a digit classifier's weights ({detail}; expected the {len(want)} "
                         "tensors fastddpm eval --train-classifier writes)")
    if not all(bool(torch.isfinite(v).all()) for v in sd.values()):
        raise ValueError(f"{path!r} holds NaN or infinite weights; expected a trained digit classifier")
    model.load_state_dict(sd)
    return model.eval()


def save_classifier(model: DigitClassifier, path: str) -> None:
    from safetensors.torch import save_file

    from .._io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)


@torch.no_grad()
def features_and_probs(model: DigitClassifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    feats, probs = [], []
    for i in range(0, len(x), 256):
        f = model.features(x[i:i + 256].float())
        feats.append(f.double().numpy())
        probs.append(F.softmax(model.head(f), 1).double().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (N, D) and b (M, D), in float64.

    Dead ReLU units make a covariance singular, so both covariances get the same small ridge (1e-6 of their
    mean variance), in sqrtm and in the traces alike: the result is the exact distance between the ridged
    Gaussians, 0 for identical sets and never negative (a ridge in sqrtm alone biased it by -2 D eps)."""
    from scipy import linalg

    for name, f in (("a", a), ("b", b)):
        if not isinstance(f, np.ndarray) or f.ndim != 2 or f.shape[0] < 2 or not np.isfinite(f).all():
            got = (f"shape {f.shape}" + ("" if np.isfinite(f).all() else ", with NaN or inf")
                   if isinstance(f, np.ndarray) else type(f).__name__)
            raise ValueError(f"{name}: expected a numpy array (N, D) of finite features, N >= 2, got {got}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: expected features of the same width D, got {a.shape[1]} and {b.shape[1]}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    D = s1.shape[0]
    scale = (np.trace(s1) + np.trace(s2)) / (2 * D)
    off = np.eye(D) * (1e-6 * scale if scale > 0 else 1e-12)
    s1, s2 = s1 + off, s2 + off
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.asarray(covmean[0] if isinstance(covmean, tuple) else covmean).real
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    return max(fd, 0.0)  # (identical sets give about -1e-13: rounding, not a distance)


def evaluate(images: torch.Tensor, classifier: DigitClassifier | None = None) -> dict:
    """Metrics of images (N, 1, 16, 16) in [-1, 1] against the held-out test split."""
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        got = f"a {images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images: expected a float tensor (N, 1, 16, 16) in [-1, 1], got {got}")
    if images.dim() != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"images: expected (N, 1, 16, 16) in [-1, 1], got {tuple(images.shape)}")
    if images.numel() and not (bool(torch.isfinite(images).all()) and -1 <= images.min() and images.max() <= 1):
        lo, hi = images.min().item(), images.max().item()  # (uint8-range images scored an FD of 3e7)
        raise ValueError(f"images: expected finite values in [-1, 1], got values in [{lo:g}, {hi:g}]")
    if images.shape[0] < 2:
        raise ValueError(f"images: need at least 2 images for a covariance, got {images.shape[0]}")
    clf = classifier or load_classifier()
    ref, _ = digits_split("test", 16)
    fr, _ = features_and_probs(clf, ref)
    fs, ps = features_and_probs(clf, images)
    conf = ps.max(1)
    counts = np.bincount(ps.argmax(1), minlength=10) / len(ps)
    nz = counts[counts > 0]
    return {"n": int(images.shape[0]), "fd": frechet_distance(fs, fr), "confidence": float(conf.mean()),
            "confident_0.9": float((conf > 0.9).mean()),
            # 0.0 - x: one class gives 0, not -0.0; log2(10) = 3.32: all classes equally
            "class_entropy_bits": 0.0 - float((nz * np.log2(nz)).sum()),
            "class_counts": (counts * len(ps)).round().astype(int).tolist()}
