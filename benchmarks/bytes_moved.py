"""Bytes each fused op moves against the eager sequence it replaces: the GPU analysis in the README.

    python benchmarks/bytes_moved.py [--bandwidth GBPS] [--markdown FILE]

Runs each implementation once on the CPU under fastddpm.bench.countops.CountOps, which adds up, kernel by
kernel, the tensors every non-view operator reads and writes (no reuse between kernels through a cache,
as on a GPU for tensors larger than its L2); a fastddpm op is charged its GPU kernels pass by pass
(countops.PASSES: the fused GroupNorm+SiLU is 3 launches that read x twice; ATen's GroupNorm is charged
its passes too). Shapes are the U-Net's at a
size where bytes, not launches, bound a GPU. The minimum (countops.min_bytes) is what the op must move at
least: its inputs read once and its outputs written once. Each implementation runs once uncounted first,
so one-time state (cached schedule scalars, the U-Net's time projections) is not charged to it. Other ATen
operators, attention's included, are charged their inputs once (a flash kernel rereads K and V per query
tile, mostly from L2). "Floor" is the total divided by the copy bandwidth (default: 2,947 GB/s, measured on
an H100 by benchmarks/gpu_suite.py), the time no kernel can beat; the kernel count times a launch (~5 us
from Python) is the other floor at small sizes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm import DDPMScheduler, NoiseSchedule, ops  # noqa: E402
from fastddpm.bench.countops import count, min_bytes  # noqa: E402
from fastddpm.bench.ops import eager_add_noise, eager_group_norm_silu, fused_group_norm_silu, grad_fn  # noqa: E402
from fastddpm.bench.suite import shape_str as _x  # noqa: E402
from fastddpm.ops import reference  # noqa: E402


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


# The U-Net's shapes at a size where bytes, not launches, bound a GPU; tests pass tiny ones.
SHAPES = dict(image=(64, 3, 256, 256), group_norm=(64, 256, 32, 32), attention=(16, 1024, 256),
              network="cifar10", batch=16)


def rows(shapes: dict | None = None) -> list[dict]:
    """(case, implementation, kernels, read, written, minimum) for each op and the whole step.

    ``shapes`` replaces entries of SHAPES: ``image`` (q_sample, ddpm_step), ``group_norm`` (32 groups),
    ``attention`` (B, N, d; one head), ``network`` and ``batch`` for the whole step (network None: no
    whole-step rows).
    """
    import diffusers

    sh = {**SHAPES, **(shapes or {})}
    out = []
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule()
    dsched = diffusers.DDPMScheduler()

    def add(case, impl, fn, minimum, grad=False):
        t = count(fn, grad=grad)  # after one uncounted call: one-time state is not charged
        out.append(dict(case=case, impl=impl, kernels=t.kernels, read=t.read, written=t.written, minimum=minimum))

    img = tuple(sh["image"])
    x0, eps = torch.randn(img, generator=g), torch.randn(img, generator=g)
    t = torch.randint(0, 1000, (img[0],), generator=g)
    case = f"q_sample {_x(img)}"
    add(case, "eager (diffusers add_noise)", lambda: eager_add_noise(x0, eps, t, sched.alphas_cumprod),
        min_bytes("q_sample", img))
    add(case, "fastddpm (fused)", lambda: ops.q_sample(x0, t, eps, sched), min_bytes("q_sample", img))
    case = f"q_sample + v target {_x(img)}"
    add(case, "eager (add_noise + get_velocity)",
        lambda: (dsched.add_noise(x0, eps, t), dsched.get_velocity(x0, eps, t)), min_bytes("q_sample", img, v=True))
    add(case, "fastddpm (fused, target='v')", lambda: ops.q_sample(x0, t, eps, sched, target="v"),
        min_bytes("q_sample", img, v=True))

    xt, m, z = torch.randn(img, generator=g), torch.randn(img, generator=g), torch.randn(img, generator=g)
    case = f"ddpm_step {_x(img)}"
    mn = min_bytes("ddpm_step", img)
    add(case, "diffusers step (draws its noise)", lambda: dsched.step(m, 500, xt, generator=g).prev_sample, mn)
    add(case, "fastddpm, noise tensor (fused)", lambda: ops.ddpm_step(xt, m, 500, sched, noise=z, clip_sample=True),
        min_bytes("ddpm_step", img, noise_tensor=True))
    add(case, "fastddpm, in-kernel Philox (fused)",
        lambda: ops.ddpm_step(xt, m, 500, sched, noise="philox", seed=1, clip_sample=True), mn)

    gshape = tuple(sh["group_norm"])
    C = gshape[1]
    gn, gn_bwd = min_bytes("group_norm_silu", gshape), min_bytes("group_norm_silu", gshape, backward=True)
    x = torch.randn(gshape, generator=g)
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    case = f"group_norm_silu fwd {_x(gshape)}"
    add(case, "eager (group_norm, silu)", lambda: eager_group_norm_silu(x, w, b), gn)
    add(case, "fastddpm (fused)", lambda: fused_group_norm_silu(x, w, b), gn)
    xg, wg, bg = (a.clone().requires_grad_() for a in (x, w, b))
    dy = torch.randn(gshape, generator=g)
    case = f"group_norm_silu fwd+bwd {_x(gshape)}"
    add(case, "eager (autograd of group_norm, silu)", grad_fn(eager_group_norm_silu, (xg, wg, bg), dy), gn_bwd,
        grad=True)
    add(case, "fastddpm (fused forward and backward)", grad_fn(fused_group_norm_silu, (xg, wg, bg), dy), gn_bwd,
        grad=True)

    B, N, d = sh["attention"]
    q, k, v = (torch.randn(B, 1, N, d, generator=g) for _ in range(3))
    an, an_bwd = min_bytes("attention", (B, 1, N, d)), min_bytes("attention", (B, 1, N, d), backward=True)
    case = f"attention fwd {_x((B, 1, N, d))}"
    add(case, "materialised (softmax(QK^T) V)", lambda: reference.attention(q, k, v), an)
    add(case, "fastddpm (fused: no N x N scores)", lambda: ops.attention(q, k, v), an)
    qg, kg, vg = (a.clone().requires_grad_() for a in (q, k, v))
    do = torch.randn(B, 1, N, d, generator=g)
    case = f"attention fwd+bwd {_x((B, 1, N, d))}"
    add(case, "materialised (autograd)", grad_fn(reference.attention, (qg, kg, vg), do), an_bwd, grad=True)
    add(case, "fastddpm (fused forward and backward)", grad_fn(ops.attention, (qg, kg, vg), do), an_bwd, grad=True)

    if sh["network"] is None:
        return out
    # the whole denoising step of the U-Net, the same weights
    from fastddpm.bench.models import network
    from fastddpm.compat.diffusers import to_diffusers

    net = network(sh["network"])
    ours, theirs = net.ours, to_diffusers(net.ours).eval()
    batch = sh["batch"]
    xs = torch.randn(batch, *net.image_shape, generator=g)
    tb = torch.full((batch,), 500)
    ours_sched = DDPMScheduler()
    label = {"cifar10": "CIFAR-10"}.get(net.name, net.name)
    case = f"denoising step, {label} U-Net, batch {batch}"
    add(case, "diffusers (UNet2DModel + DDPMScheduler.step)",
        lambda: dsched.step(theirs(xs, tb).sample, 500, xs, generator=g).prev_sample, float("nan"))
    add(case, "fastddpm (UNet + fused step)",
        lambda: ours_sched.step(ours(xs, tb), 500, xs, generator=g).prev_sample, float("nan"))
    return out


def render(rs: list[dict], bandwidth_gbps: float) -> str:
    lines = ["| op (fp32) | implementation | kernels | MB read | MB written | MB moved | x minimum | floor at "
             f"{bandwidth_gbps:,.0f} GB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rs:
        tot = r["read"] + r["written"]
        ratio = f"{tot / r['minimum']:.2f}x" if r["minimum"] == r["minimum"] else "-"
        floor = tot / (bandwidth_gbps * 1e9) * 1e6
        lines.append(f"| {r['case']} | {r['impl']} | {r['kernels']} | {_mb(r['read'])} | {_mb(r['written'])} | "
                     f"{_mb(tot)} | {ratio} | {floor:,.0f} µs |")
    return "\n".join(lines)


MARKDOWN = (".md", ".markdown", ".txt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth", type=float, default=2947.0, metavar="GBPS",
                    help="copy bandwidth for the floor column (default: 2947, an H100's, measured)")
    ap.add_argument("--markdown", default=None, metavar="FILE")
    a = ap.parse_args(argv)
    if not a.bandwidth > 0:
        ap.error(f"--bandwidth: expected a positive number, got {a.bandwidth}")
    if a.markdown is not None:  # before the counting, not after it
        from fastddpm._io import check_output_file

        try:
            check_output_file(a.markdown, "--markdown", MARKDOWN)
        except ValueError as exc:
            ap.error(str(exc))
    text = render(rows(), a.bandwidth)
    print(text)
    if a.markdown is not None:
        from fastddpm._io import atomic_path

        with atomic_path(a.markdown) as tmp, open(tmp, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
