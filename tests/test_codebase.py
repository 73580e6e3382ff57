"""Rules about the code itself that no op test would notice breaking (issue 16)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def hash_calls(source: str) -> list[int]:
    """Line numbers of calls to the builtin hash() in ``source``.

    Tests have no use for hash() but seeding, and hash() of a str (or of a tuple holding one) changes
    from process to process (PYTHONHASHSEED), so a failure seeded from it cannot be replayed: seed from
    _utils.stable_seed instead."""
    return [n.lineno for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hash"]


def test_hash_calls_finds_a_hash_seed():
    src = "import torch\ng = torch.Generator().manual_seed(hash((shape, 'x')) % 2**31)\nh = 'hash(1)'\n"
    assert hash_calls(src) == [2]
    assert hash_calls("g = torch.Generator().manual_seed(stable_seed(shape, 'x'))\n") == []


def test_no_test_seeds_from_hash():
    files = sorted(TESTS.glob("*.py"))
    assert len(files) > 10, f"found only {len(files)} test files under {TESTS}"
    bad = [f"{f.name}:{line}" for f in files for line in hash_calls(f.read_text())]
    assert not bad, f"hash() in tests (not reproducible across processes; use _utils.stable_seed): {bad}"


def private_fastddpm_imports(source: str) -> list[str]:
    """The fastddpm modules ``source`` imports whose dotted name has a part starting with ``_``
    (fastddpm.triton_kernels' own modules excepted; relative imports stay inside it)."""
    names = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Import):
            mods = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            # `from fastddpm.ops import _dispatch` imports the private module fastddpm.ops._dispatch
            mods = [f"{n.module}.{a.name}" for a in n.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[0] != "fastddpm" or parts[:2] == ["fastddpm", "triton_kernels"]:
                continue
            if any(p.startswith("_") for p in parts[1:]):
                names.append(m)
    return names


def test_private_import_check_finds_private_modules():
    src = ("from fastddpm.ops._layout import batch_major_dense\nfrom fastddpm.ops import _dispatch, reference\n"
           "import fastddpm._C\nfrom fastddpm import ops\nfrom fastddpm.triton_kernels._common import x\n"
           "from ._common import launch_device\n")
    assert private_fastddpm_imports(src) == [
        "fastddpm.ops._layout.batch_major_dense", "fastddpm.ops._dispatch", "fastddpm._C"]


def test_triton_kernels_import_no_private_fastddpm_module():
    # The kernels sit below the package: reaching up into its private modules ties them to its internals
    # and risks import cycles (fastddpm.ops imports the kernels lazily).
    files = sorted((ROOT / "triton_kernels").glob("*.py"))
    assert len(files) >= 6, f"found only {len(files)} files under triton_kernels/"
    bad = {f.name: m for f in files if (m := private_fastddpm_imports(f.read_text()))}
    assert not bad, f"triton_kernels import private fastddpm modules: {bad}"


def package_sources() -> dict[str, Path]:
    """Every source module of the installed package by its dotted name: fastddpm/**.py, and triton_kernels/*.py
    as fastddpm.triton_kernels.* (setup.py's package_dir)."""
    out = {}
    for base, prefix in ((ROOT / "fastddpm", ("fastddpm",)), (ROOT / "triton_kernels", ("fastddpm", "triton_kernels"))):
        for f in base.rglob("*.py"):
            parts = prefix + f.relative_to(base).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _top_level_names(source: str) -> set[str]:
    names = set()
    for n in ast.parse(source).body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
    return names


def import_graph(sources: dict[str, str], packages: set[str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, from every import statement in its source: at module level
    and inside functions alike (a lazy import delays a dependency, it does not remove it); only the imports
    under ``if TYPE_CHECKING:``, which never run, are left out.

    ``from M import n`` counts as importing M.n when that is a module (or is not bound in M's __init__: an
    extension module such as fastddpm._C), else M. The implicit import of a module's parent packages is left
    out: Python runs a package's __init__ before its submodules whatever they import."""
    bound = {p: _top_level_names(sources[p]) for p in packages if p in sources}
    graph = {}
    for name, source in sources.items():
        pkg = name if name in packages else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(source)
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for stmt in n.body for x in ast.walk(stmt)}
        for n in ast.walk(tree):
            if id(n) in typing_only:
                continue
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1]) if n.level else ""
                mod = ".".join(p for p in (base, n.module) if p)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in sources or a.name not in bound.get(mod, {a.name})
                           else mod for a in n.names]
            else:
                continue
            deps.update(t for t in targets if t.split(".")[0] == "fastddpm" and t != name)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_import_cycle_check_finds_a_lazy_cycle():
    # b imports a only inside a function: still a circle. c imports a name from the package (its __init__), d
    # an extension module the package does not define; neither is a circle.
    sources = {
        "fastddpm": "from . import ops\n",
        "fastddpm.ops": "x = 1\n",
        "fastddpm.s": "",
        "fastddpm.s.a": "from .b import f\nfrom .. import ops\n",
        "fastddpm.s.b": "import torch\ndef f():\n    from fastddpm.s.a import g\n",
        "fastddpm.s.c": "from . import a\nfrom fastddpm import ops as o, x\nfrom .. import _C\n",
    }
    graph = import_graph(sources, {"fastddpm", "fastddpm.s"})
    assert graph["fastddpm.s.a"] == {"fastddpm.s.b", "fastddpm.ops"}
    assert graph["fastddpm.s.c"] == {"fastddpm.s.a", "fastddpm.ops", "fastddpm.x", "fastddpm._C"}
    assert import_cycles(graph) == [["fastddpm.s.a", "fastddpm.s.b"]]
    sources["fastddpm.s.b"] = "import torch\n"
    assert import_cycles(import_graph(sources, {"fastddpm", "fastddpm.s"})) == []
    sources["fastddpm.ops"] = "from fastddpm import s\n"  # through the package fastddpm.s
    sources["fastddpm.s"] = "from .c import o\n"
    assert import_cycles(import_graph(sources, {"fastddpm", "fastddpm.s"})) == [
        ["fastddpm.ops", "fastddpm.s", "fastddpm.s.a", "fastddpm.s.c"]]
    sources["fastddpm.ops"] = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fastddpm import s\n"
    assert import_cycles(import_graph(sources, {"fastddpm", "fastddpm.s"})) == []


def test_no_import_cycles_among_fastddpm_modules():
    files = package_sources()
    assert len(files) > 40 and "fastddpm.samplers.sample" in files, sorted(files)
    packages = {name for name, f in files.items() if f.name == "__init__.py"}
    graph = import_graph({name: f.read_text() for name, f in files.items()}, packages)
    assert graph["fastddpm.samplers.sample"], "the import graph found no imports in samplers/sample.py"
    assert not (cycles := import_cycles(graph)), f"import circles among fastddpm modules: {cycles}"


def private_ops_uses(source: str, module: str, public: set[str]) -> list[str]:
    """What ``source`` (the module named ``module``) takes from fastddpm.ops that is not its public API: an
    import of a private module (fastddpm.ops._checks) or of a name that fastddpm.ops does not export in
    ``public`` (its __all__: ``from fastddpm.ops.ddpm_step import kernel``), and attribute reads ``ops.X``
    (the module imported under its own name) of such names (``ops._dispatch``, ``ops.randn_in_op``). The
    calls these names make are the op layer's to change; a caller that reaches them bypasses its checks."""
    pkg = module.rpartition(".")[0]
    ops_aliases, found = set(), []

    def private_module(m):
        parts = m.split(".")
        return parts[:2] == ["fastddpm", "ops"] and any(p.startswith("_") for p in parts[2:])

    tree = ast.parse(source)
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                if private_module(a.name):
                    found.append(a.name)
                elif a.name == "fastddpm.ops" and a.asname:
                    ops_aliases.add(a.asname)
        elif isinstance(n, ast.ImportFrom):
            base = ".".join(pkg.split(".")[: len(pkg.split(".")) - n.level + 1]) if n.level else ""
            mod = ".".join(p for p in (base, n.module) if p)
            for a in n.names:
                if mod == "fastddpm" and a.name == "ops":
                    ops_aliases.add(a.asname or "ops")
                elif private_module(mod) or private_module(f"{mod}.{a.name}"):
                    found.append(f"{mod}.{a.name}")
                elif mod.split(".")[:2] == ["fastddpm", "ops"] and a.name not in public:
                    found.append(f"{mod}.{a.name}")
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ops_aliases
                and n.attr not in public):
            found.append(f"fastddpm.ops.{n.attr}")
    return found


def test_private_ops_check_finds_private_names():
    public = {"attention", "ddpm_step", "prepare_step", "check_tensor", "reference"}
    src = ("from .. import ops\nfrom ..ops import _checks as c, prepare_step\nfrom ..ops._codes import NOISE_NONE\n"
           "from ..ops.ddpm_step import kernel, ddpm_step\nimport fastddpm.ops._dispatch\n"
           "def f(x):\n    ops.check_tensor(x, 'x')\n"
           "    return ops._dispatch.resolve(), ops.randn_in_op, torch.ops.x\n")
    assert sorted(private_ops_uses(src, "fastddpm.samplers.ddpm", public)) == sorted([
        "fastddpm.ops._checks", "fastddpm.ops._codes.NOISE_NONE", "fastddpm.ops.ddpm_step.kernel",
        "fastddpm.ops._dispatch", "fastddpm.ops._dispatch", "fastddpm.ops.randn_in_op"])
    clean = "import fastddpm.ops as o\nfrom fastddpm.ops.attention import attention\nstep = o.prepare_step\n"
    assert private_ops_uses(clean, "fastddpm.nn.attention", public) == []
    assert private_ops_uses("import fastddpm.ops as o\nx = o._library\n", "fastddpm.nn.x", public) == [
        "fastddpm.ops._library"]


def test_samplers_models_nn_use_only_the_public_ops_api():
    # The samplers, models and modules call the ops through what fastddpm.ops exports (the op functions,
    # prepare_step, the check helpers): its private modules are the op layer's to change.
    import fastddpm.ops

    public = set(fastddpm.ops.__all__)
    files = package_sources()
    chosen = {m: f for m, f in files.items() if m.split(".")[:2] in (["fastddpm", "samplers"], ["fastddpm", "models"],
                                                                      ["fastddpm", "nn"])}
    assert len(chosen) >= 12 and "fastddpm.samplers.ddpm" in chosen, sorted(chosen)
    bad = {m: u for m, f in chosen.items() if (u := private_ops_uses(f.read_text(), m, public))}
    assert not bad, f"private fastddpm.ops names used outside the op layer: {bad}"


# ----------------------------------------------------------------------------- integer codes by name
CODE_ARGS = {"PRED_TYPE", "VAR_TYPE", "NOISE_MODE", "noise_mode", "mode", "prediction_type", "variance_type"}


def elementwise_h_codes() -> dict[str, int]:
    """The enums of csrc/include/fastddpm/elementwise.h, the one table of the schemas' integer codes:
    {"kEpsilon": 0, ...}."""
    import re

    src = (ROOT / "csrc" / "include" / "fastddpm" / "elementwise.h").read_text()
    codes: dict[str, int] = {}
    for body in re.findall(r"enum \w+ : int64_t \{(.*?)\};", src, re.S):
        for name, value in re.findall(r"(k\w+)\s*=\s*(\d+)", body):
            codes[name] = int(value)
    return codes


def _camel(name: str) -> str:  # "v_prediction" / "V_PREDICTION" -> "VPrediction"
    return "".join(p.capitalize() for p in name.lower().split("_"))


def test_code_tables_agree_with_elementwise_h():
    """fastddpm/ops/_codes.py and triton_kernels/_common.py give every code elementwise.h names, with its
    value, and no other (names matched as kFixedSmall ~ "fixed_small" ~ FIXED_SMALL)."""
    from fastddpm.triton_kernels import _common

    from fastddpm.ops import _codes

    header = elementwise_h_codes()
    assert {"kEpsilon", "kVPrediction", "kFixedSmall", "kLearnedRange", "kNoNoise", "kNoisePhilox"} <= set(header)
    python = {f"k{_camel(k)}": v for k, v in {**_codes.PREDICTION_TYPES, **_codes.VARIANCE_TYPES}.items()}
    python.update(kNoNoise=_codes.NOISE_NONE, kNoiseTensor=_codes.NOISE_TENSOR, kNoisePhilox=_codes.NOISE_PHILOX)
    assert python == header
    triton = {f"k{_camel(k)}": getattr(_common, k).value for k in dir(_common)
              if k.isupper() and type(getattr(_common, k)).__name__ == "constexpr"}
    assert triton == header


def bare_code_comparisons(source: str) -> list[int]:
    """Line numbers where a code argument (CODE_ARGS) is compared with a bare integer."""
    bad = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Compare):
            sides = [n.left, *n.comparators]
            names = {s.id for s in sides if isinstance(s, ast.Name)}
            if names & CODE_ARGS and any(isinstance(s, ast.Constant) and type(s.value) is int for s in sides):
                bad.append(n.lineno)
    return bad


def test_bare_code_check_finds_a_number():
    src = "if PRED_TYPE == 0:\n    pass\nif PRED_TYPE == EPSILON:\n    pass\nif n == 0:\n    pass\n"
    assert bare_code_comparisons(src) == [1]


def test_triton_kernels_compare_codes_by_name():
    files = sorted((ROOT / "triton_kernels").glob("*.py"))
    assert len(files) >= 6
    bad = [f"{f.name}:{line}" for f in files for line in bare_code_comparisons(f.read_text())]
    assert not bad, f"codes compared with bare numbers (use triton_kernels/_common.py's names): {bad}"
