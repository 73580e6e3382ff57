"""The benchmark suite behind `fastddpm bench`: cases, the interleaved runner, the tables and CSV rows.

A case is one workload at one size with several providers (fastddpm's and its peers'). Its providers are
timed interleaved in one process, A B C A B C ..., so that a drift of the machine hits all of them alike;
each sample is the mean of ``inner`` calls, the number of rounds fits a time budget. Reported per
provider: the median time, the speed-up against the best peer (the fastest provider that is not
fastddpm's) as the median of the per-round ratios with their interquartile range, and a throughput:
GB/s (the minimum bytes the op must move), GFLOP/s (matmuls and convolutions, counted by
torch.utils.flop_counter), images/s or it/s. Training cases add the peak tensor memory.

The GPU cost proxy ("counts" cases) runs each provider once under a TorchDispatchMode and reports the
aten operators it dispatches and the bytes of the tensors they return, per denoising step and per
training step.

Three sizes: ``smoke`` (the quick suite at its smallest setting: tiny shapes and network, two rounds, and
one tiny sampling case on the full suite's long-case path; it proves the suite runs and measures nothing
worth quoting), ``quick`` (a few minutes on a 2-core CPU) and
``full`` (every shape of the per-op suites, the CIFAR-10 network end to end, 1000-step sampling: hours
on a 2-core CPU; ``--only`` picks cases).
"""

from __future__ import annotations

import datetime
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median

from . import ops as bops
from .timing import peak_rss_mib, spread, time_calls

SUITES = ("smoke", "quick", "full")
COMPONENTS = {"torch.randn alone"}
OWN_NETWORK = {"denoising-diffusion-pytorch"}


def role(provider: str) -> str:
    """What a provider is in its case:

    * "ours": fastddpm, or diffusers patched by fastddpm;
    * "peer": another implementation of the same computation (torch eager, torch.compile, diffusers with
      the same weights, SDPA): the best of them is what fastddpm is measured against;
    * "other": the same task with its own network (denoising-diffusion-pytorch's U-Net of matching
      widths, other FLOPs): shown with its ratio, never the best peer;
    * "bound": a floor no implementation can beat (a copy of exactly the op's minimum bytes);
    * "component": one part of the work alone (drawing the noise), for scale: neither a bound nor a peer.
    """
    if provider.startswith("fastddpm") or "patch" in provider:
        return "ours"
    if provider.startswith(bops.COPY):
        return "bound"
    if provider in COMPONENTS:
        return "component"
    if provider in OWN_NETWORK:
        return "other"
    return "peer"


@dataclass
class Case:
    """A workload at one size and its providers: a case of the suite, of a per-op script, of the GPU suite
    (which reads ``dtype`` and ``extra`` and builds its providers from them)."""

    kind: str  # "op", "unet", "sampling", "training" or "counts"
    workload: str  # the op's name for the GPU suite
    shape: str | tuple
    build: Callable[[], dict] | None = None  # provider -> callable | Skip | (callable, model, optimizer) | counts
    rate: Callable[[str], tuple[float, str]] | None = None  # provider -> (work per call, unit)
    budget_s: float = 8.0  # time for the timed rounds (after warm-up)
    min_rounds: int = 3
    max_rounds: int = 15
    warmup: int = 2
    target_sample_s: float = 0.0  # each sample the mean of enough calls to last this long (0: one call)
    note: str = ""
    prewarm: Callable[[], dict] | None = None  # cheaper providers of the same names, each called once first
    memory: bool = False  # measure each provider's peak resident memory after the timed rounds
    rounds: int = 0  # a fixed number of rounds (0: from the budget)
    # one untimed call before each timed sample: the op's steady state. Without it the sample after a provider
    # that allocates and frees much (diffusers' step: 20 ms of large temporaries) pays for fresh pages, about
    # 0.5 ms at 16x3x256x256, whichever op comes next. None: op cases settle, the others (long) cannot afford it.
    settle: bool | None = None
    dtype: object = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.settle is None:
            self.settle = self.kind == "op"

    @property
    def name(self) -> str:
        return f"{self.workload} {shape_str(self.shape)}"

    @property
    def op(self) -> str:
        return self.workload

    @property
    def backward(self) -> bool:
        return bool(self.extra.get("backward"))

    @property
    def label(self) -> str:
        tags = [f"{k}={v}" if not isinstance(v, bool) else k for k, v in self.extra.items() if v is not False]
        return self.workload + (f"[{','.join(tags)}]" if tags else "")


@dataclass
class Result:
    case: Case
    rows: list[dict] = field(default_factory=list)
    error: str = ""


# ----------------------------------------------------------------------------- the cases
def shape_str(s) -> str:
    return s if isinstance(s, str) else "x".join(map(str, s))


# workload -> (providers(shape, compile), bytes or FLOPs per call(shape, provider)): the op cases of the suite
# and of the per-op scripts in benchmarks/
OPS: dict[str, tuple[Callable, Callable]] = {
    "q_sample": (lambda s, c: bops.q_sample_providers(s, compile=c, copy=True),
                 lambda s, p: (bops.q_sample_bytes(s, p), "GB/s")),
    "ddpm_step, generator noise": (lambda s, c: bops.ddpm_step_providers(s, compile=c, noise="generator"),
                                   lambda s, p: (bops.ddpm_step_bytes(s, p), "GB/s")),
    "ddpm_step, tensor noise": (lambda s, c: bops.ddpm_step_providers(s, compile=c, noise="tensor"),
                                lambda s, p: (bops.ddpm_step_bytes(s, p), "GB/s")),
    "ddim_step": (lambda s, c: bops.ddim_step_providers(s, compile=c),
                  lambda s, p: (bops.ddim_step_bytes(s, p), "GB/s")),
    "group_norm_silu fwd": (lambda s, c: bops.group_norm_silu_providers(s, compile=c, copy=True),
                            lambda s, p: (bops.group_norm_silu_bytes(s), "GB/s")),
    "group_norm_silu fwd+bwd": (lambda s, c: bops.group_norm_silu_providers(s, compile=c, backward=True, copy=True),
                                lambda s, p: (bops.group_norm_silu_bytes(s, True), "GB/s")),
    "attention fwd": (lambda s, c: bops.attention_providers(s[0], s[2], s[3], compile=c),
                      lambda s, p: (bops.attention_flops(s[0], s[2], s[3]), "GFLOP/s")),
    "attention fwd+bwd": (lambda s, c: bops.attention_providers(s[0], s[2], s[3], compile=c, backward=True),
                          lambda s, p: (bops.attention_flops(s[0], s[2], s[3], True), "GFLOP/s")),
}


def op_case(workload: str, shape: tuple, compile: bool = False, **kw) -> Case:
    """The case of one op (a key of OPS) at one shape; ``kw``: Case's scheduling fields."""
    providers, rate = OPS[workload]
    return Case("op", workload, shape_str(shape), lambda: providers(shape, compile), rate=lambda p: rate(shape, p),
                **kw)


def _op_cases(suite: str, compile: bool) -> list[Case]:
    smoke, full = suite == "smoke", suite == "full"
    img = [(1, 3, 8, 8)] if smoke else ([(1, 3, 32, 32), (16, 3, 32, 32), (128, 3, 32, 32), (16, 3, 256, 256)]
                                        if full else [(16, 3, 32, 32)])
    step = [(1, 3, 8, 8)] if smoke else ([(1, 3, 32, 32), (16, 3, 32, 32), (16, 3, 256, 256)]
                                         if full else [(16, 3, 32, 32)])
    gn = [(2, 32, 4, 4)] if smoke else ([(b, c, h, h) for b in (1, 16) for c, h in ((128, 32), (256, 16),
                                                                                      (256, 8), (256, 4))]
                                        if full else [(16, 128, 32, 32)])
    gn_bwd = [(2, 32, 4, 4)] if smoke else ([(16, 128, 32, 32), (16, 256, 16, 16)] if full else [])
    att = [(1, 16, 8)] if smoke else ([(1, 256, 256), (16, 256, 256), (1, 1024, 128), (16, 1024, 128)]
                                      if full else [(16, 256, 256)])
    att_bwd = [(1, 16, 8)] if smoke else ([(1, 256, 256), (16, 256, 256)] if full else [])
    # torch.compile costs a compilation per case (the first one ~15 s here): in smoke only once
    kw = dict(target_sample_s=0.005, budget_s=2.0 if smoke else 6.0, min_rounds=2 if smoke else 5,
              max_rounds=2 if smoke else 25)
    plan = [("q_sample", s, compile) for s in img]
    plan += [(f"ddpm_step, {noise} noise", s, compile and not smoke) for s in step for noise in ("generator", "tensor")]
    plan += [("ddim_step", s, compile and not smoke) for s in step]
    plan += [("group_norm_silu fwd", s, compile and not smoke) for s in gn]
    plan += [("group_norm_silu fwd+bwd", s, compile and not smoke) for s in gn_bwd]
    plan += [("attention fwd", (B, 1, N, d), compile and not smoke) for B, N, d in att]
    plan += [("attention fwd+bwd", (B, 1, N, d), compile and not smoke) for B, N, d in att_bwd]
    return [op_case(w, s, c, **kw) for w, s, c in plan]


_NETS: dict[str, object] = {}


def _net(name: str):
    from .models import network

    if name not in _NETS:
        _NETS[name] = network(name)
    return _NETS[name]


def _flops_rate(fns: dict):
    """provider -> (FLOPs per call, "GFLOP/s"), counted once per provider on first use."""
    from .countops import flops

    cache: dict[str, float] = {}

    def rate(p):
        if p not in cache:
            cache[p] = float(flops(fns[p])) if callable(fns.get(p)) else float("nan")
        return cache[p], "GFLOP/s"

    return rate


def _unet_case(net_name: str, batch: int, smoke: bool) -> Case:
    from .workloads import unet_forward_providers

    holder: dict = {}

    def build():
        holder.update(unet_forward_providers(_net(net_name), batch))
        return dict(holder)

    rate = _flops_rate(holder)
    return Case("unet", f"U-Net forward, {net_name}", f"batch {batch}", build, rate=rate,
                budget_s=1.0 if smoke else 6.0, min_rounds=2 if smoke else 5, max_rounds=2 if smoke else 15,
                note="denoising-diffusion-pytorch: its own U-Net of the same widths")


def _sampling_case(net_name: str, batch: int, steps: int, smoke: bool, long: bool = False) -> Case:
    from .workloads import SUITE_SAMPLERS, sampling_providers

    which = SUITE_SAMPLERS
    if long:  # the drop-in pipeline costs what fastddpm.sample costs per step: leave it out of hour-long runs
        which = ("fastddpm.sample", "diffusers DDPMPipeline", "denoising-diffusion-pytorch")
    # long runs: a 2-step run of each provider warms it up; two rounds where a round takes seconds, one
    # where it takes an hour (CIFAR-10 at 1000 steps)
    rounds = 1 if (long and net_name == "cifar10") else 2
    return Case("sampling", f"sampling {net_name}, {steps} steps", f"batch {batch}",
                lambda: sampling_providers(_net(net_name), batch, steps, which=which),
                rate=lambda p, b=batch: (b, "images/s"),
                budget_s=0.0 if long else (1.0 if smoke else 12.0), min_rounds=rounds if long else (2 if smoke else 3),
                max_rounds=rounds if long else (2 if smoke else 7), warmup=0 if long else 1,
                prewarm=(lambda: sampling_providers(_net(net_name), batch, 2, which=which)) if long else None,
                note="denoising-diffusion-pytorch: DDIM (eta 0) below 1000 steps, its own U-Net" if steps < 1000
                else "denoising-diffusion-pytorch: its own U-Net")


def _training_case(net_name: str, batch: int, smoke: bool, seconds: float = 6.0, warmup: int = 2) -> Case:
    from .workloads import training_providers

    return Case("training", f"training step, {net_name}", f"batch {batch}",
                lambda: training_providers(_net(net_name), batch),
                rate=lambda p: (1.0, "it/s"), budget_s=1.0 if smoke else seconds,
                min_rounds=2 if smoke else 3, max_rounds=2 if smoke else 15, warmup=warmup,
                note="peak = parameters + AdamW state + what one step allocates at its peak")


def _counts_cases(net_name: str, batch: int, smoke: bool) -> list[Case]:
    from .workloads import denoising_step_counters, training_providers

    steps = 2 if smoke else 4
    return [
        Case("counts", f"per denoising step, {net_name}", f"batch {batch}",
             lambda: {k: (v, False, steps) if callable(v) else v
                      for k, v in denoising_step_counters(_net(net_name), batch, steps).items()},
             note=f"a {steps}-step sampling run, divided by {steps}"),
        Case("counts", f"per training step, {net_name}", f"batch {batch}",
             lambda: {k: ((v[0], True, 1) if isinstance(v, tuple) else v)
                      for k, v in training_providers(_net(net_name), batch).items()},
             note="forward, backward and AdamW step (a second step: the optimizer state exists)"),
    ]


def cases(suite: str = "quick", compile: bool = True) -> list[Case]:
    """The cases of a suite, in the order they run (pure: builds no model)."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {', '.join(SUITES)}, got {suite!r}")
    smoke, full = suite == "smoke", suite == "full"
    out = _op_cases(suite, compile)
    if smoke:
        out.append(_unet_case("tiny", 1, True))
        out += [_sampling_case("tiny", b, 2, True) for b in (1, 2)]
        # the 1000-step cases' path (prewarm on 2 steps, no warm-up, fixed rounds, fewer providers), tiny
        out.append(_sampling_case("tiny", 1, 3, True, long=True))
        out += [_training_case("tiny", b, True) for b in (2,)]
        out += _counts_cases("tiny", 1, True)
        return out
    out.append(_unet_case("cifar10", 1, False))
    if full:
        out.append(_unet_case("cifar10", 16, False))
    out += [_sampling_case("digits", b, 50, False) for b in (1, 16)]
    out.append(_sampling_case("cifar10", 1, 50, False))
    if full:
        out.append(_sampling_case("cifar10", 16, 50, False))
        out += [_sampling_case("digits", b, 1000, False, long=True) for b in (1, 16)]
        out += [_sampling_case("cifar10", b, 1000, False, long=True) for b in (1, 16)]
    out += [_training_case("digits", b, False) for b in (16, 64)]
    # one warm-up step makes the AdamW state; a second one costs ~2 s per provider here
    out.append(_training_case("cifar10", 16, False, seconds=30.0, warmup=1))
    if full:
        out.append(_training_case("cifar10", 64, False, seconds=60.0, warmup=1))
    out += _counts_cases("cifar10", 1, False)
    if full:
        out += _counts_cases("cifar10", 16, False)
    return out


def select(all_cases: list[Case], only: list[str] | None) -> list[Case]:
    """Cases named by ``only``: a whole case name picks that case, anything else every case whose name
    contains it (case-insensitive)."""
    if not only:
        return all_cases
    names = {c.name.lower() for c in all_cases}
    keys = [s.lower() for s in only]
    return [c for c in all_cases
            if any(c.name.lower() == k if k in names else k in c.name.lower() for k in keys)]


# ----------------------------------------------------------------------------- running
def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def run_case(case: Case, log: Callable[[str], None] = lambda s: None) -> Result:
    """Build the providers, warm them up one by one, then time them interleaved; rows for the table."""
    from .workloads import Skip

    res = Result(case)
    try:
        built = case.build()
    except Exception as exc:  # noqa: BLE001  (a case that cannot be built is reported, not fatal)
        res.error = _error(exc)
        res.rows.append(_row(case, "-", status=res.error))
        return res
    if case.kind == "counts":
        return _run_counts(case, built, res)
    fns: dict[str, Callable[[], object]] = {}
    extra: dict[str, tuple] = {}
    skipped: dict[str, str] = {}
    for name, v in built.items():
        if isinstance(v, Skip):
            skipped[name] = f"skipped: {v}"
        elif isinstance(v, tuple):
            fns[name], extra[name] = v[0], v[1:]
        else:
            fns[name] = v
    if case.prewarm is not None:  # long cases: warm each provider on a short version of the workload
        try:
            warm = case.prewarm()
        except Exception as exc:  # noqa: BLE001  (reported like a case that cannot be built)
            res.error = _error(exc)
            res.rows.append(_row(case, "-", status=res.error))
            return res
        for name, fn in warm.items():
            if name in fns and callable(fn):
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001  (reported like a failing warm-up)
                    skipped[name] = _error(exc)
                    del fns[name]
    est: dict[str, float] = {}
    for name in list(fns):  # warm-up, one provider at a time; a provider that fails is reported
        try:
            for _ in range(case.warmup):
                fns[name]()
            est[name] = time_calls(fns[name]) if case.warmup else 0.0
        except Exception as exc:  # noqa: BLE001
            skipped[name] = _error(exc)
            del fns[name]
    if not fns:
        res.rows += [_row(case, n, status=s) for n, s in skipped.items()]
        return res
    inner = {n: max(1, min(1000, round(case.target_sample_s / max(est[n], 1e-7)))) if case.target_sample_s else 1
             for n in fns}
    per_round = sum(est[n] * (inner[n] + case.settle) for n in fns)
    rounds = case.rounds or (case.min_rounds if per_round <= 0 else
                             int(max(case.min_rounds, min(case.max_rounds, case.budget_s // per_round))))
    log(f"  {case.name}: {len(fns)} providers, {rounds} rounds")
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            if case.settle:
                fn()
            times[n].append(time_calls(fn, inner[n]))
    res.rows += summarise(case, times, {n: inner[n] for n in fns})
    if case.memory:
        for r in res.rows:
            r["peak_mib"] = peak_rss_mib(fns[r["provider"]])
    if case.kind == "training":
        from .timing import peak_tensor_bytes
        from .workloads import persistent_bytes

        for r in res.rows:
            model, opt = extra[r["provider"]]
            gc.collect()
            peak = peak_tensor_bytes(fns[r["provider"]]) + persistent_bytes(model, opt)
            r["peak_mib"] = peak / 2**20
    res.rows += [_row(case, n, status=s) for n, s in skipped.items()]
    return res


def summarise(case: Case, times: dict[str, list[float]], inner: dict[str, int] | None = None) -> list[dict]:
    """Rows (one per provider) from interleaved samples: medians, quartiles, speed-up vs the best peer."""
    med = {n: median(ts) for n, ts in times.items()}
    peers = [n for n in times if role(n) == "peer"]
    best = min(peers, key=lambda n: med[n]) if peers else None
    rows = []
    for n, ts in times.items():
        q1, q3 = spread(ts)
        r = _row(case, n, median_s=med[n], q1_s=q1, q3_s=q3, rounds=len(ts), inner=(inner or {}).get(n, 1))
        if best is not None:
            ratios = [b / t for b, t in zip(times[best], ts)]  # paired: the same round
            lo, hi = spread(ratios)
            r.update(best_peer=best, speedup=median(ratios), speedup_q1=lo, speedup_q3=hi)
        if case.rate is not None:
            try:
                work, unit = case.rate(n)
            except Exception:  # noqa: BLE001
                work, unit = float("nan"), ""
            if unit in ("GB/s", "GFLOP/s"):
                r.update(rate=work / med[n] / 1e9, rate_unit=unit)
            else:
                r.update(rate=work / med[n], rate_unit=unit)
        rows.append(r)
    return rows


def _run_counts(case: Case, built: dict, res: Result) -> Result:
    from .countops import count
    from .workloads import Skip

    for name, v in built.items():
        if isinstance(v, Skip):
            res.rows.append(_row(case, name, status=f"skipped: {v}"))
            continue
        fn, grad, per = v
        try:
            c = count(fn, grad=grad)
        except Exception as exc:  # noqa: BLE001
            res.rows.append(_row(case, name, status=_error(exc)))
            continue
        res.rows.append(_row(case, name, ops=c.ops / per, kernels=c.kernels / per, bytes=c.bytes / per))
    base = next((r for r in res.rows if r["provider"].startswith("diffusers") and "ops" in r), None)
    for r in res.rows:
        if base is not None and "ops" in r:
            r["ops_vs_diffusers"] = base["ops"] / r["ops"]
            r["bytes_vs_diffusers"] = base["bytes"] / r["bytes"] if r["bytes"] else float("nan")
    return res


def _row(case: Case, provider: str, **kw) -> dict:
    return {"kind": case.kind, "workload": case.workload, "shape": case.shape, "provider": provider,
            "role": role(provider) if provider != "-" else "-", **kw, "note": case.note}


# ----------------------------------------------------------------------------- tables
def fmt_time(s: float) -> str:
    if not isinstance(s, (int, float)) or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs" if s >= 1e-5 else f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def _num(x: float, unit: str = "") -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    v = f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{v} {unit}".strip()


def render_timings(rows: list[dict]) -> str:
    """The main table (markdown): one line per provider of each timed case."""
    lines = ["| workload | shape | provider | median | vs best peer (IQR) | throughput | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "counts":
            continue
        who = r["provider"] + {"bound": " *(bound)*", "component": " *(component)*",
                               "other": " *(own U-Net)*"}.get(r.get("role"), "")
        if r.get("status"):
            lines.append(f"| {r['workload']} | {r['shape']} | {who} | {r['status']} | | | |")
            continue
        if "speedup" in r:
            sp = f"{r['speedup']:.2f}x ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})"
            if r["provider"] == r.get("best_peer"):
                sp = "1.00x (best peer)"
        else:
            sp = "-"
        peak = _num(r.get("peak_mib", float("nan")))
        lines.append(f"| {r['workload']} | {r['shape']} | {who} | {fmt_time(r['median_s'])} | {sp} | "
                     f"{_num(r.get('rate', float('nan')), r.get('rate_unit', ''))} | {peak} |")
    return "\n".join(lines)


def render_counts(rows: list[dict]) -> str:
    """The GPU cost proxy table (markdown)."""
    lines = ["| per | network, batch | provider | aten ops | kernels (non-view ops) | MB allocated | "
             "diffusers / this (ops, MB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") != "counts":
            continue
        per = r["workload"].replace("per ", "")
        if r.get("status"):
            lines.append(f"| {per} | {r['shape']} | {r['provider']} | {r['status']} | | | |")
            continue
        ratio = (f"{r['ops_vs_diffusers']:.2f}x, {r['bytes_vs_diffusers']:.2f}x"
                 if "ops_vs_diffusers" in r else "-")
        lines.append(f"| {per} | {r['shape']} | {r['provider']} | {r['ops']:.0f} | {r['kernels']:.0f} | "
                     f"{r['bytes'] / 1e6:.2f} | {ratio} |")
    return "\n".join(lines)


LEGEND = (
    "Medians of interleaved rounds. *vs best peer*: the best peer's time over this provider's, as the median "
    "(and interquartile range) of the per-round ratios; > 1 is faster than the best peer. Peers compute the "
    "same thing (torch eager, torch.compile, diffusers with the same weights, SDPA); *own U-Net* rows "
    "(denoising-diffusion-pytorch) run the same task on their own network of matching widths (other FLOPs) and "
    "are never the best peer; *bound* rows copy exactly the minimum bytes the op must move (a floor no "
    "implementation beats); *component* rows run one part of the op's work alone (drawing the noise). GB/s "
    "counts the minimum bytes an op must move; GFLOP/s counts matmuls and convolutions. Peak MiB: parameters, "
    "AdamW state and the most tensor memory a step allocates at once (from the allocator's events).")


def render(rows: list[dict], header: dict | None = None) -> str:
    """The whole report: the machine, the timing table, the cost-proxy table."""
    out = []
    if header:
        out.append("\n".join(f"- {k}: {v}" for k, v in header.items()))
        out.append("")
    out.append(render_timings(rows))
    out += ["", LEGEND]
    if any(r.get("kind") == "counts" for r in rows):
        out += ["", "GPU cost proxy (operators dispatched and bytes they allocate, TorchDispatchMode):", "",
                render_counts(rows)]
    return "\n".join(out)


def run(suite: str = "quick", only: list[str] | None = None, compile: bool = True,
        log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Run a suite; returns (rows, header). Each row also carries the run's id and suite."""
    from . import refuse_reference_run
    from .timing import copy_bandwidth, load_average, machine, versions

    refuse_reference_run()  # the suite's fastddpm rows must time fastddpm's kernels
    selected = select(cases(suite, compile), only)
    run_id = datetime.datetime.now().isoformat(timespec="seconds")
    header = {"machine": machine(), "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
              "suite": suite, "date": run_id, "load average at start": load_average()}
    if suite != "smoke":
        header["copy bandwidth"] = f"{copy_bandwidth() / 1e9:.1f} GB/s (64 MiB copy_, read + write)"
    rows: list[dict] = []
    t0 = time.perf_counter()
    for c in selected:
        t = time.perf_counter()
        res = run_case(c, log=log)
        for r in res.rows:
            r.update(run_id=run_id, suite=suite)
        rows += res.rows
        log(f"  {c.name}: {time.perf_counter() - t:.1f} s")
    header["load average at end"] = load_average()
    header["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    return rows, header


# ----------------------------------------------------------------------------- the per-op scripts
def pytest_benchmark(providers: Callable[[tuple], dict], shapes: list, names: list[str], needs: str | None = None):
    """A pytest-benchmark test (assign it to a ``test_*`` name of a script): each of the providers ``names`` of
    ``providers(shape)`` at each shape, one at a time; skipped without the package ``needs``."""
    import pytest

    @pytest.mark.parametrize("shape", shapes, ids=shape_str)
    @pytest.mark.parametrize("provider", names)
    def test(benchmark, shape, provider):
        if needs:
            pytest.importorskip(needs)
        benchmark(providers(shape)[provider])

    return test


class OptionError(ValueError):
    """A script's own option that its plan cannot read: a usage error (one line, exit 2) from script_main."""


def op_script(doc: str, workloads: list[str], shapes: list, argv=None, rounds: int = 25):
    """script_main over op_case(workload, shape) for each shape and workload (keys of OPS)."""
    return script_main(doc, lambda a: [op_case(w, s, a.compile, target_sample_s=0.005) for s in shapes
                                       for w in workloads], argv, rounds=rounds)


def script_main(doc: str, plan: Callable[[object], list[Case]], argv=None, rounds: int = 25,
                extend: Callable | None = None) -> tuple[list[dict], object]:
    """The command line of a script in benchmarks/: its cases (``plan(args)``) timed interleaved, the table
    printed (with the machine, the copy bandwidth and the load before and after) and, with --csv, the rows
    appended to a CSV. ``extend(parser)`` adds the script's own options. Returns (rows, args)."""
    import argparse

    from .timing import copy_bandwidth, load_average, machine, write_csv

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", "--reps", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    ap.add_argument("--csv", default=None, metavar="FILE", help="append the rows (with the machine) to FILE")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile providers")
    ap.add_argument("--providers", default="", help="comma-separated subset of providers (the peers always run)")
    if extend is not None:
        extend(ap)
    args = ap.parse_args(argv)
    from .._io import check_output_file
    from ..cli import UsageError, check_threads
    from .timing import check_appendable

    try:  # before the work, not after it
        if args.rounds < 1:
            raise UsageError(f"--rounds: expected a positive integer, got {args.rounds}")
        if args.threads is not None:
            check_threads(args.threads)
        if args.csv is not None:
            check_output_file(args.csv, "--csv", (".csv",))
            check_appendable(args.csv, "--csv")
    except (UsageError, ValueError) as exc:
        ap.error(str(exc))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    keep = {p for p in args.providers.split(",") if p}  # (before plan: a script's plan may reuse the name)
    try:
        cases_ = plan(args)  # (the scripts' own options are read here)
    except OptionError as exc:
        ap.error(str(exc))
    if keep and cases_:  # a name that matches no provider dropped its rows without a word
        known: set[str] = set()
        for c in cases_:
            try:
                known |= set(c.build())
            except Exception:  # noqa: BLE001 (a case that cannot build here is reported as a row by run_case)
                pass
        unknown = sorted(keep - known)
        if unknown and known:
            ap.error(f"--providers: no provider named {unknown[0]!r}; these cases have: {', '.join(sorted(known))}")
    rows: list[dict] = []
    if cases_:
        print(f"# {machine()}; copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s; load average {load_average()}",
              flush=True)
    for c in cases_:
        c.rounds = c.rounds or max(1, args.rounds)
        if keep:
            c.build = (lambda b: lambda: {k: v for k, v in b().items() if k in keep or role(k) == "peer"})(c.build)
        rows += run_case(c, log=lambda s: print(s, flush=True)).rows
    if rows:
        print(render_timings(rows) + "\n\n" + LEGEND + f"\n\nload average at the end: {load_average()}")
    if args.csv and rows:
        write_csv(args.csv, rows)
    return rows, args
