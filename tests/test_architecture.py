"""The house rules, checked from the source (docs/architecture.md): layering, no import cycles, no
module reaching into another's private names, no long functions outside the kernels, and the rules
of sequence parallelism having one source that every user follows."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "longtrain"
KERNEL_DIRS = ("kernels",)  # Triton/CUDA kernels may be long; everything else stays readable
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _from_base(node: ast.ImportFrom, name: str, is_pkg: bool) -> str:
    """The absolute module of `from X import ...` in module `name` (relative imports resolved)."""
    base = node.module or ""
    if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return base


def _known_module(target: str, known: set[str]) -> str:
    """'from pkg import name': the submodule if it is one, else pkg ('' outside `known`)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """longtrain modules imported anywhere in the file (module level, inside functions, TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, name, is_pkg)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            t = _known_module(t, known)
            if t and t.startswith("longtrain") and t != name:
                out.add(t)
    # string tables of lazy imports (package __init__ _EXPORTS): edges too
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known \
                and node.value != name and is_pkg:
            out.add(node.value)
    return out


def _private_imports(path: Path, name: str, known: set[str]) -> list[str]:
    """'importer <- module: _name' for each `from X import _name` (not a dunder) where X is another
    longtrain module than the importer; a package importing its own submodule's private name counts."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        src = _known_module(_from_base(node, name, is_pkg), known)
        if not src.startswith("longtrain") or src == name:
            continue
        out += [f"{name} <- {src}: {a.name}" for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def _long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'name (n lines)' for each function or method (nested ones too) longer than `limit` lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append(f"{node.name} ({n} lines)")
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, m, known) for m, p in mods.items()}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles_among_modules():
    g = _graph()
    # packages re-export lazily; an edge from a package to its own submodule is not a cycle risk
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and m != "longtrain")} for m, ts in g.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("layer,forbidden", [
    ("kernels", {"models", "parallel", "launcher", "bench"}),
    ("models", {"parallel", "launcher", "bench"}),
    ("parallel", {"launcher", "bench"}),
])
def test_layers_import_nothing_above_them(layer, forbidden):
    bad = sorted(f"{m} -> {t}" for m, ts in _graph().items() if _layer(m) == layer
                 for t in ts if _layer(t) in forbidden)
    assert not bad, bad


def test_the_cycle_detector_finds_a_cycle(tmp_path):
    """The check above can fail: two files importing each other inside functions form a cycle."""
    pkg = tmp_path / "longtrain"
    (pkg / "x").mkdir(parents=True)
    (pkg / "x" / "a.py").write_text("def f():\n    from longtrain.x import b\n")
    (pkg / "x" / "b.py").write_text("from longtrain.x.a import f\n")
    known = {"longtrain.x.a", "longtrain.x.b"}
    assert _imports(pkg / "x" / "a.py", "longtrain.x.a", known) == {"longtrain.x.b"}
    assert _imports(pkg / "x" / "b.py", "longtrain.x.b", known) == {"longtrain.x.a"}


def test_no_module_imports_another_modules_private_names():
    """A name another module needs is public; `_name` stays inside its module (dunders are fine)."""
    mods = _modules()
    known = set(mods)
    bad = [v for m, p in sorted(mods.items()) for v in _private_imports(p, m, known)]
    assert not bad, bad


def test_the_private_import_check_finds_one(tmp_path):
    """The check above can fail: absolute, relative and package-to-submodule imports of a `_name`."""
    pkg = tmp_path / "longtrain"
    (pkg / "x").mkdir(parents=True)
    (pkg / "x" / "__init__.py").write_text("from .a import _f, public\n")
    (pkg / "x" / "a.py").write_text("from longtrain.x.a import _own\nfrom . import b\n"
                                    "def f():\n    from .b import _g, __version__\n")
    (pkg / "x" / "b.py").write_text("from longtrain.x.a import _f as f, public\nfrom longtrain.x import _h\n"
                                    "from os.path import _joinrealpath\n")
    known = {"longtrain.x", "longtrain.x.a", "longtrain.x.b"}
    assert _private_imports(pkg / "x" / "__init__.py", "longtrain.x", known) == [
        "longtrain.x <- longtrain.x.a: _f"]
    assert _private_imports(pkg / "x" / "a.py", "longtrain.x.a", known) == ["longtrain.x.a <- longtrain.x.b: _g"]
    assert sorted(_private_imports(pkg / "x" / "b.py", "longtrain.x.b", known)) == [
        "longtrain.x.b <- longtrain.x.a: _f", "longtrain.x.b <- longtrain.x: _h"]


def test_no_long_functions_outside_kernels():
    """No function or method over MAX_FUNCTION_LINES lines (Triton/CUDA kernels excepted)."""
    long = {m: fs for m, p in sorted(_modules().items()) if _layer(m) not in KERNEL_DIRS
            for fs in [_long_functions(p)] if fs}
    assert not long, long


def test_the_long_function_check_finds_one(tmp_path):
    """The check above can fail: an 81-line method is reported, an 80-line function is not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    src = tmp_path / "m.py"
    src.write_text(f"def fits():\n{body}\nclass C:\n    def too_long(self):\n"
                   + body.replace("    ", "        ") + "        return x0\n")
    assert _long_functions(src) == ["too_long (81 lines)"]


# ---- one source for the rules of sequence parallelism --------------------------------------------

@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("kv", [1, 2, 4, 8])
def test_planner_and_runtime_pick_the_same_ulysses_degree(world, kv):
    """The planner's hybrid traffic is computed for the degree sequence_parallel_attention runs with
    (they differed at W = 8 with 8 KV heads: the planner assumed 8, the runtime used 4)."""
    from longtrain.launcher import sizing as plan
    from longtrain.models import model_config
    from longtrain.parallel import sp_attention

    cfg = model_config(dim=256, n_layers=2, n_heads=8, n_kv_heads=kv, vocab_size=256)
    planned = plan.sp_comm_bytes(cfg, "hybrid", world, 1024, 2)["ulysses"]
    runtime = sp_attention.default_ulysses_degree(world, cfg.n_heads, cfg.n_kv_heads)  # what it calls
    assert planned == runtime
    assert world % runtime == 0 and runtime < world  # a proper divisor: ring across world/u groups
    if (world, kv) == (8, 8):
        assert runtime == 4


def test_auto_impl_is_the_same_everywhere():
    """'auto' as training resolves it (SPAttention), as the attention hook resolves it per call, and
    as the planner reports it."""
    import torch

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.plan import load_for_plan, make_plan
    from longtrain.parallel.mesh import SPAttention
    from longtrain.parallel.ops import SequenceParallelOps

    for kv in (2, 4):
        recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.toml"
        sets = [f"model.n_kv_heads={kv}", "parallel.sp=2", "parallel.sp_impl=auto"]
        r = load_recipe(str(recipe), sets)
        cfg = r.model_config()
        trained = SPAttention.from_parallel(r.parallel, cfg.n_heads, cfg.n_kv_heads).impl
        seen = []
        ops = SequenceParallelOps(None, impl="auto")
        import longtrain.parallel.sp_attention as spa

        orig = spa.sequence_parallel_attention
        spa.sequence_parallel_attention = lambda *a, impl, **k: seen.append(impl) or a[0]
        try:
            q = torch.zeros(1, 4, cfg.n_heads, cfg.head_dim)
            k = torch.zeros(1, 4, cfg.n_kv_heads, cfg.head_dim)
            ops.softmax(q, k, k)
        finally:
            spa.sequence_parallel_attention = orig
        r2, _ = load_for_plan(str(recipe), sets)
        planned = make_plan(r2, gpus=2).layout["sp_impl"]
        assert trained == seen[0] == planned == ("tokenring" if kv == cfg.n_heads else "ring")
