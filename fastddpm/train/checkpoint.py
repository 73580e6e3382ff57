"""Checkpoints that survive crashes.

A checkpoint is a folder ``<out>/checkpoints/step-00001000/`` holding
``model.safetensors``, ``ema.safetensors``, ``optimizer.safetensors`` (the optimizer's tensors) and
``state.json`` (format tag, step, training config, UNet config, optimizer param groups, RNG states of
torch, CUDA, numpy and python, grad-scaler state, and the SHA-256 of every weight file).

Writing: every file goes into a hidden temporary folder, is fsynced, and the folder is renamed into place
(one atomic rename), then ``checkpoints/latest`` (a one-line pointer) is replaced atomically. A kill -9 at
any moment leaves either the previous checkpoint or the new one, never half of one; leftovers of an
interrupted write are hidden ``.tmp-*`` folders that are ignored and cleaned up by the next save.
Reading checks the format tag and the checksums, so a truncated or foreign file is a clear error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from .._errors import one_line
from .._io import atomic_path, dir_mode, file_mode

FORMAT = "fastddpm-train-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
# The three files of a checkpoint, named once (save_checkpoint writes them, state.json lists them, resume reads them).
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE = WEIGHT_FILES


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt or not fastddpm's."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    d = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return d


def set_rng_state(d: dict, ckpt: str = "") -> None:
    try:
        _set_rng_state(d)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: state.json's rng table is damaged ({exc!r})") from exc


def _set_rng_state(d: dict) -> None:
    torch.set_rng_state(_unb64(d["torch"]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = d["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if d.get("cuda") and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in d["cuda"]])


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: str, step: int, *, model, ema, optimizer, state: dict, keep: int = 2) -> str:
    """Write checkpoint ``step`` under ``root`` (``<out>/checkpoints``) atomically; returns its folder."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of a write killed half-way: folders, or files (the latest pointer)
        if name.startswith(".tmp-"):
            p = os.path.join(root, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(p)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700 whatever the umask; it becomes the checkpoint
    files = {
        MODEL_FILE: {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        EMA_FILE: {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
    }
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    files[OPTIMIZER_FILE] = opt_tensors
    from safetensors import SafetensorError

    try:
        sums = {}
        for fn, tensors in files.items():
            p = os.path.join(tmp, fn)
            save_file(tensors, p, metadata={"format": FORMAT})
            os.chmod(p, file_mode())  # safetensors writes 0600 whatever the umask
            _fsync_file(p)
            sums[fn] = _sha256(p)
        meta = dict(state)
        meta.update({"format": FORMAT, "version": VERSION, "step": int(step), "optimizer": opt_meta,
                     "rng": rng_state(), "files": sums})
        p = os.path.join(tmp, "state.json")
        with open(p, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except (OSError, SafetensorError) as exc:  # a full disk: safetensors' error is no OSError
        shutil.rmtree(tmp, ignore_errors=True)  # (the half-written files would keep the disk full)
        cks = list_checkpoints(root)
        kept = cks[-1][1] if cks else None
        raise OSError(f"{root}: cannot write the checkpoint of step {step} ({one_line(exc, 200)}); "
                      + (f"the last complete one, {kept}, is kept" if kept else "no earlier checkpoint exists")
                      ) from exc
    final = os.path.join(root, step_dir_name(step))
    if os.path.exists(final):  # rewriting the same step (a resumed run's end): move the old one aside
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=root)
        os.replace(final, os.path.join(old, "x"))
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(root, step_dir_name(step))
    _prune(root, keep, int(step))
    return final


def _write_latest(root: str, name: str) -> None:
    with atomic_path(os.path.join(root, "latest")) as tmp, open(tmp, "w") as f:
        f.write(name + "\n")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def _prune(root: str, keep: int, step: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``step``, the one just written. Those of later steps are left
    alone: they come from a run that was resumed from an earlier checkpoint, are not older than this one,
    and a resume that reaches their step replaces them (counting them deleted the checkpoint just written)."""
    cks = [c for c in list_checkpoints(root) if c[0] <= step]
    for _, path in cks[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def any_checkpoint(path: str) -> bool:
    """Whether ``path`` (a run folder) holds a checkpoint: state.json, a ``latest`` pointer or a step folder,
    usable or damaged (resolve() then says what is wrong). The hidden ``.tmp-*`` folders of an interrupted
    save do not count: they are never resumed from."""
    if os.path.exists(os.path.join(path, "state.json")):
        return True
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root) and any(n == "latest" or _STEP_RE.match(n) for n in os.listdir(root)):
            return True
    return False


def resolve(path: str, name: str = "checkpoint") -> str:
    """A checkpoint folder from: a checkpoint folder, a run folder (its latest), or a checkpoints folder;
    ``name``: what the errors call the path (the flag that gave it)."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        ptr = os.path.join(root, "latest")
        if os.path.isfile(ptr):
            with open(ptr) as f:
                entry = f.read().strip()
            cand = os.path.join(root, entry)
            if _STEP_RE.match(entry) and os.path.isfile(os.path.join(cand, "state.json")):
                return cand
        cks = list_checkpoints(root)
        if cks:
            return cks[-1][1]
    if not os.path.exists(path):
        raise CheckpointError(f"{name}: no such folder {path!r}")
    raise CheckpointError(f"{name}: no fastddpm training checkpoint in {path!r} "
                          f"(expected state.json, or checkpoints/latest of a run folder)")


def read_state(ckpt: str) -> dict:
    """state.json of a checkpoint folder, checked (format tag and the weight files' checksums)."""
    p = os.path.join(ckpt, "state.json")
    try:
        with open(p) as f:
            meta = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: state.json is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: state.json is truncated or not JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt}: not a fastddpm training checkpoint (format tag missing)")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"checkpoint {ckpt}: state.json's version is not an integer ({version!r}; the file is "
                              "damaged)")
    if version > VERSION:
        raise CheckpointError(f"checkpoint {ckpt}: format version {meta['version']} is newer than this "
                              f"fastddpm reads ({VERSION})")
    if isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"checkpoint {ckpt}: state.json holds no step (a non-negative integer)")
    if not isinstance(meta.get("unet_config"), dict):
        raise CheckpointError(f"checkpoint {ckpt}: state.json holds no unet_config (the network's settings)")
    for key in ("config", "optimizer", "rng", "files"):  # every checkpoint's state.json holds these tables
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"checkpoint {ckpt}: state.json holds no {key} table (the file is damaged)")
    def damaged(what: str):
        return CheckpointError(f"checkpoint {ckpt}: state.json's {what} (the file is damaged)")

    missing = [fn for fn in WEIGHT_FILES if not isinstance(meta["files"].get(fn), str)]
    if missing:  # (an empty table would skip every checksum)
        raise damaged(f"files table has no checksum of {', '.join(missing)}")
    ema_n = meta.get("ema_updates", meta["step"])
    if isinstance(ema_n, bool) or not isinstance(ema_n, int) or not 0 <= ema_n <= meta["step"]:
        raise damaged(f"ema_updates is not an integer in [0, step] ({ema_n!r})")
    window = meta.get("log_window", [0.0, 0])  # (earlier checkpoints lack the seconds)
    if not (isinstance(window, list) and len(window) in (2, 3) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
            and isinstance(window[1], int) and window[1] >= 0 and min(window[2:] or [0]) >= 0):
        raise damaged(f"log_window is not [loss sum, count, seconds] ({window!r})")
    elapsed = meta.get("elapsed_s", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < float("inf"):
        raise damaged(f"elapsed_s is not a number of seconds ({elapsed!r})")
    if not isinstance(meta["optimizer"].get("scalars", {}), dict):
        raise damaged(f"optimizer table's scalars are not a table ({meta['optimizer']['scalars']!r})")
    for fn, digest in meta["files"].items():
        fp = os.path.join(ckpt, fn)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {ckpt}: {fn} is missing")
        if _sha256(fp) != digest:
            raise CheckpointError(f"checkpoint {ckpt}: {fn} is truncated or corrupt (checksum mismatch)")
    return meta


def load_tensors(ckpt: str, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.path.join(ckpt, name))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {name}: {exc}") from exc


def load_weights(module: torch.nn.Module, ckpt: str, name: str) -> None:
    """``name`` (MODEL_FILE or EMA_FILE) of a checkpoint loaded into ``module``, the network that
    its state.json describes; weights of another network are a CheckpointError, not load_state_dict's."""
    try:
        module.load_state_dict(load_tensors(ckpt, name))
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {name} does not hold the weights of the network its state.json "
                              f"describes ({one_line(exc, 200)})") from exc


def load_optimizer(ckpt: str, meta: dict, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_tensors(ckpt, OPTIMIZER_FILE)
    try:
        optimizer.load_state_dict(_optimizer_state_dict(tensors, meta["optimizer"]))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # (load_state_dict: ValueErrors)
        raise CheckpointError(f"checkpoint {ckpt}: the optimizer state does not fit this run's optimizer, or "
                              f"state.json's optimizer table is damaged ({one_line(exc, 200)})") from exc
