"""Training data: a float32 tensor (N, C, S, S) in [-1, 1] held in memory, or an image folder streamed.

Sources: ``digits`` (scikit-learn's 1,797 8x8 handwritten digits, bilinearly upscaled; the ``train`` split
is 80% of them, the ``test`` split the other 20%, fixed forever so evaluation stays held out), an .npy/.npz
array (in memory), or a folder of PNG/JPEG files (searched recursively; mixed sizes are centre-cropped to
squares and resized), which training streams: each image is decoded and resized when its batch needs it,
by DataLoader worker processes (ImageFolder, stream_batches).

Batches are a pure function of (seed, step): the sample at global position p = step * B + j is
``perm(seed, p // N)[p % N]``. Resuming therefore needs no data-loader state, and under torchrun each
process takes a contiguous slice of the same global batch (what DistributedSampler does with a shared
permutation).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DIGITS_TEST_FRACTION = 0.2


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:  # (N, C, H, W) in [0, 1]
    if x.shape[-2:] == (size, size):
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(size, size), mode=mode, **kw).clamp(0, 1)


def digits_split(split: str = "train", image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, S, S) in [-1, 1], labels (N,)) of scikit-learn's digits, split ``train`` or ``test``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ValueError("data: 'digits' needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(20200619))
    n_test = int(round(DIGITS_TEST_FRACTION * len(x)))
    idx = {"test": perm[:n_test], "train": perm[n_test:], "all": torch.arange(len(x))}[split]
    x = _resize(x[idx], image_size)
    return x * 2 - 1, y[idx]


def _from_array(a: np.ndarray, name: str) -> torch.Tensor:
    given = a.shape  # the error names the shape the file holds, not a transposed view of it
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1] not in (1, 3, 4) or 0 in a.shape:
        raise ValueError(f"data: {name}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W) with C in "
                         f"1, 3, 4 and N, H, W > 0, got shape {given}")
    if a.shape[1] == 4:
        a = a[:, :3]
    if a.dtype == np.uint8:
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        x = torch.from_numpy(a.astype(np.float32))
        if not torch.isfinite(x).all():
            raise ValueError(f"data: {name}: holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi <= 1:
            pass
        elif lo >= -1 and hi <= 1:
            x = (x + 1) / 2
        elif lo >= 0 and hi <= 255:
            x = x / 255.0
        else:
            raise ValueError(f"data: {name}: values in [{lo}, {hi}]; expected uint8, [0, 1] or [-1, 1]")
    else:
        raise ValueError(f"data: {name}: unsupported dtype {a.dtype}")
    return x


def _load_array(path: str) -> torch.Tensor:
    import zipfile
    import zlib

    from .._io import read_npz_or_npy

    z = read_npz_or_npy(path, "data")
    try:
        if isinstance(z, np.ndarray):
            a = z
        else:
            keys = list(z.keys())
            only = keys[0] if len(keys) == 1 else None
            key = next((k for k in ("images", "x", "arr_0") if k in keys), only)
            if not keys:
                raise ValueError(f"data: {path}: the .npz file holds no array")
            if key is None:
                raise ValueError(f"data: {path}: several arrays {keys}; name the images 'images' or 'x'")
            try:
                a = z[key]
            except ValueError as exc:  # an object array ("cannot be loaded when allow_pickle=False"), a bad header
                raise ValueError(f"data: {path}: the array {key!r} cannot be read as images ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"data: {path!r} is a truncated or corrupt .npz file ({exc})") from exc
    finally:
        if not isinstance(z, np.ndarray):
            z.close()
    return _from_array(np.asarray(a), path)


GREY_MODES = ("L", "1", "I", "I;16", "I;16B", "I;16L", "LA")
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L")  # 16-bit PNGs open as one of these: 0..65535


class ImageFolder(torch.utils.data.Dataset):
    """A folder of PNG/JPEG files (searched recursively, sorted), decoded, centre-cropped and resized one
    item at a time: memory holds a few images, never the folder (50,000 256x256 images decoded at once
    would be 9.8 GB). Item i is a float32 (C, S, S) tensor in [-1, 1].

    Opening the folder reads only each file's header (size and mode): C is 1 when every image is grey,
    else 3; S is ``image_size`` or the smallest side in the folder.
    """

    def __init__(self, root: str, image_size: int | None = None) -> None:
        from PIL import Image, UnidentifiedImageError

        files = []
        for folder, _, names in os.walk(root):
            files += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
        # A FIFO or device named x.png would block the header read forever (a broken link still fails, named)
        files = [f for f in files if os.path.isfile(f) or not os.path.exists(f)]
        files.sort()
        if not files:
            raise ValueError(f"data: no PNG or JPEG images found under {root}")
        grey, smallest = True, None
        for fn in files:
            try:
                with Image.open(fn) as im:  # header only: no pixel is decoded here
                    mode, (w, h) = im.mode, im.size
            except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
                raise ValueError(f"data: cannot read image {fn}: {exc}") from exc
            grey = grey and mode in GREY_MODES
            smallest = min(w, h) if smallest is None else min(smallest, w, h)
        self.root, self.files = root, files
        self.mode = "L" if grey else "RGB"
        self.channels = 1 if grey else 3
        self.size = image_size or smallest

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, self.size, self.size)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        fn = self.files[i]
        try:
            with Image.open(fn) as im:
                if im.mode in WIDE_GREY_MODES:
                    # 16-bit grey (PNG): convert() would clip every value above 255 to white; scaled to the
                    # 8-bit range instead, kept in float (mode "F") through the crop and resize
                    im = Image.fromarray(np.asarray(im, dtype=np.float32) / 257.0, mode="F")
                else:
                    im = im.convert(self.mode)
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"data: cannot read image {fn}: {exc}") from exc
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != self.size:
            im = im.resize((self.size, self.size), Image.BICUBIC if s < self.size else Image.LANCZOS)
        a = np.asarray(im)
        if im.mode == "F":
            a = np.clip(a, 0.0, 255.0)[..., None].repeat(self.channels, -1)  # resampling may overshoot
        a = a[..., None] if a.ndim == 2 else a
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0 * 2 - 1  # (C, S, S)


class StepBatches(torch.utils.data.Sampler):
    """The index lists of steps start..stop-1 (this process's slice of each global batch): the DataLoader
    decodes exactly the images the in-memory path would index, so streaming changes no result and a
    resumed run starts at its step."""

    def __init__(self, seed: int, start: int, stop: int, batch: int, n: int, lo: int, local: int) -> None:
        self.seed, self.start, self.stop, self.batch, self.n, self.lo, self.local = (
            seed, start, stop, batch, n, lo, local)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_indices(self.seed, step, self.batch, self.n)[self.lo:self.lo + self.local].tolist()


def stream_batches(ds: ImageFolder, seed: int, start: int, stop: int, batch: int, lo: int, local: int,
                   workers: int, pin_memory: bool = False):
    """An iterator of (local, C, S, S) batches for steps start..stop-1, decoded by ``workers`` processes."""
    sampler = StepBatches(seed, start, stop, batch, len(ds), lo, local)
    kw = {"prefetch_factor": 2, "persistent_workers": False, "worker_init_fn": _leave_signals_to_the_trainer} \
        if workers > 0 else {}
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                                         **kw)
    # Starting the workers draws their seed from torch's global generator: leave the training's draws
    # (initial weights, dropout) as they would be without streaming.
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    return _plain_errors(it)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """In each decoding worker: leave the trainer's process group. `timeout`, SLURM and systemd signal the
    whole group; a worker killed by it made the DataLoader raise in the trainer before the trainer could
    finish its step and save. Out of the group, the signal reaches the trainer alone, which finishes its step,
    saves and shuts its workers down; they still end with it if it is killed (the DataLoader's watchdog), and
    a SIGTERM sent to them by pid (the DataLoader's and multiprocessing's own shutdown) still ends them."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()


def _plain_errors(it):
    try:
        while True:
            try:
                yield next(it)
            except StopIteration:
                return
            except ValueError as exc:
                # A worker's error arrives wrapped with its traceback; the user needs its last line.
                last = str(exc).strip().splitlines()[-1]
                raise ValueError(last.split(": ", 1)[1] if last.startswith("ValueError: ") else last) from exc
    finally:  # closed (the run ended, or stopped early): the workers end now, not when this is collected
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def open_dataset(data: str, image_size: int | None = None) -> torch.Tensor | ImageFolder:
    """An image folder as a streaming ImageFolder; anything else as load_dataset's tensor."""
    if data != "digits" and os.path.isdir(data):
        return ImageFolder(data, image_size)
    return load_dataset(data, image_size)


def load_dataset(data: str, image_size: int | None = None) -> torch.Tensor:
    """The training set as (N, C, S, S) float32 in [-1, 1]; errors name ``data`` and the file."""
    if data == "digits":
        return digits_split("train", image_size or 16)[0]
    if not os.path.exists(data):
        raise ValueError(f"data: no such file or folder {data!r} (or use the built-in 'digits')")
    if os.path.isdir(data):
        ds = ImageFolder(data, image_size)
        x = torch.empty(ds.shape)  # (N, C, S, S): each image decoded and resized on its own
        for i in range(len(ds)):
            x[i] = ds[i]
        return x
    elif data.endswith((".npy", ".npz")):
        x = _load_array(data)
    else:
        raise ValueError(f"data: {data!r} is neither a folder of images, an .npy/.npz file, nor 'digits'")
    if x.shape[-1] != x.shape[-2] and image_size is None:
        raise ValueError(f"data: images are {x.shape[-2]}x{x.shape[-1]}; pass --image-size to make them "
                         "square")
    if x.shape[-1] != x.shape[-2]:
        s = min(x.shape[-2:])
        top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
        x = x[..., top:top + s, left:left + s]
    x = _resize(x, image_size or x.shape[-1])
    return (x * 2 - 1).contiguous()


def _mix(*ints: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style), so (seed, step) pairs never collide."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def batch_indices(seed: int, step: int, batch: int, n: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: epoch-wise permutations, a pure function of its arguments."""
    pos = torch.arange(step * batch, (step + 1) * batch, dtype=torch.int64)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in torch.unique(epochs).tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 1, e)))
        m = epochs == e
        out[m] = perm[pos[m] % n]
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s timesteps, noise and flips (the same in every process)."""
    return torch.Generator().manual_seed(_mix(seed, 2, step))
