"""Respacing (Nichol & Dhariwal 2021, sec. 4): sample with a subsequence of the training timesteps.

A model trained with T steps samples with S < T steps by walking a subsequence
s_1 < ... < s_S of {0, ..., T-1} and using the process whose cumulative alphas
are abar_{s_i}: beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}. The fused step
already forms alpha_t = abar_t / abar_{prev_t} from the pair (t, prev_t), so a
respaced step is an ordinary step with prev_t = s_{i-1}: respacing is a table
of (t, prev_t) pairs, and the model still sees the original timestep s_i (as
improved-diffusion's _WrappedModel passes it).
"""

from __future__ import annotations

import torch

__all__ = ["space_timesteps", "step_tables"]


def space_timesteps(num_train_timesteps: int, section_counts: int | str | list[int]) -> list[int]:
    """The timesteps kept, ascending (improved-diffusion's ``space_timesteps``).

    ``section_counts``: an int S (S evenly spaced steps, both ends included),
    a list of counts per equal section of [0, T) (``[10, 15, 20]``), a string
    of such counts ("10,15,20"), or "ddimS" (the stride DDIM uses: 0, k, 2k, ...).
    """
    T = int(num_train_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            if not 1 <= want <= T:
                raise ValueError(f"section_counts: {section_counts!r} asks for {want} of {T} steps")
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == want:
                    return list(range(0, T, stride))
            raise ValueError(
                f"section_counts: cannot take exactly {want} steps with an integer stride from {T}"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if not section_counts or any((not isinstance(c, int)) or c < 1 for c in section_counts):
        raise ValueError(f"section_counts: expected positive integers, got {section_counts!r}")
    size_per, extra = divmod(T, len(section_counts))
    start, out = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"section_counts: cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            out.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(out))


def step_tables(timesteps: list[int] | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, prev_t) per step in sampling order (descending t), prev_t = -1 at the last step. int64."""
    ts = sorted({int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)})
    if not ts or ts[0] < 0:
        raise ValueError(f"timesteps: expected non-negative timesteps, got {ts[:4]}")
    desc = ts[::-1]
    t = torch.tensor(desc, dtype=torch.int64, device=device)
    prev = torch.tensor(desc[1:] + [-1], dtype=torch.int64, device=device)
    return t, prev
