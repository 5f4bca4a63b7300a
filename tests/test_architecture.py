"""The shape of the code: one direction of imports, no cycles, pure kernels, short functions.

Every import statement in the five packages is read with ``ast`` (module level and inside functions alike):

* a package imports only itself and those to its left: ``plans <- attention_kernels <- profilers <- search_space <- compressor``;
* no import cycle between modules (graphlib's topological sort over module -> imported-module edges);
* ``attention_kernels/`` imports nothing from transformers (pure tensor code; the one seam to transformers is ``compressor/hf``);
* no function is longer than 100 lines, in the packages and in benchmarks/;
* no function takes more than 8 parameters, except the CLI's Typer commands (one parameter per option) and Triton
  kernels (``@triton.jit``: pointers, strides and constexprs are their only way in); stages take typed ``*Args``;
* no top-level package shares its name with a module another installed distribution provides (transformers 5.25
  requires the `kernels` distribution: a package of ours named `kernels` shadowed it and broke `import transformers`).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["plans", "attention_kernels", "profilers", "search_space", "compressor"]
MAX_FUNCTION_LINES = 100
MAX_PARAMETERS = 8


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ORDER:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # `from pkg import module`
    return found


def internal_edges() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _ in imports_of(name, path):
            if target in mods and target != name:
                edges[name].add(target)
    return edges


def test_imports_follow_the_package_order():
    mods = modules()
    bad = []
    for name, path in mods.items():
        rank = ORDER.index(name.split(".")[0])
        for target, line in imports_of(name, path):
            top = target.split(".")[0]
            if top in ORDER and ORDER.index(top) > rank:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({top} is right of {name.split('.')[0]})")
    assert not bad, "imports against plans <- kernels <- profilers <- search_space <- compressor:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = internal_edges()
    # `from pkg import name` also adds an edge to pkg's __init__; a package importing its own submodules from
    # __init__ is how a package exposes its API, so edges from a submodule to its own parent package are dropped.
    for m, targets in edges.items():
        edges[m] = {t for t in targets if not m.startswith(t + ".")}
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_kernels_are_pure_tensor_code():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {t}" for n, p in modules().items() if n.startswith("attention_kernels")
           for t, line in imports_of(n, p) if t.split(".")[0] in ("transformers", "accelerate")]
    assert not bad, "\n".join(bad)


def benchmark_files() -> list[Path]:
    return sorted((ROOT / "benchmarks").glob("*.py"))


def test_no_function_over_100_lines():
    long = []
    for path in [*modules().values(), *benchmark_files()]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 100 lines:\n" + "\n".join(long)


def private_imports(paths, root: Path = ROOT) -> list[str]:
    """``from our_module import _name`` anywhere in ``paths`` (module-level or inside functions)."""
    ours = tuple(ORDER)
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ours:
                found += [f"{path.relative_to(root)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_import_of_another_modules_private_names():
    """A leading underscore means "this module only": packages and benchmarks import public names."""
    paths = list(modules().values()) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert private_imports(paths) == []


def test_the_private_import_checker_sees_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import plans\ndef g():\n    from plans.io import _loc, loads_json\n")
    assert private_imports([f], tmp_path) == ["x.py:3 plans.io._loc"]


def test_the_checker_sees_function_level_imports(tmp_path):
    """The walk must catch an import hidden inside a function (the kind that made today's cycles)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from compressor.patching import apply\n    return apply\n")
    assert ("compressor.patching", 2) in imports_of("kernels.m", f)


def test_no_top_level_package_shadows_an_installed_distribution():
    """Our packages sit first on sys.path (editable install, repo root): a name that another distribution also
    installs hides it from every library that imports it. Expected owners come from the installed metadata."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    clashes = {pkg: [d for d in owners.get(pkg, []) if d.lower().replace("_", "-") != "attention-compressor"]
               for pkg in ORDER}
    assert not {pkg: d for pkg, d in clashes.items() if d}, clashes


def test_transformers_models_import_beside_our_packages():
    """``import transformers.modeling_utils`` (which imports the `kernels` distribution) from the repo root."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import attention_kernels, transformers.modeling_utils"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional, keyword-only, ``*args`` and ``**kwargs`` parameters, without ``self`` / ``cls``."""
    a = node.args
    named = [x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return len(named) + bool(a.vararg) + bool(a.kwarg)


def exempt_from_parameter_rule(node) -> bool:
    """A Typer command (``@app.command(...)``) or a Triton kernel (``@triton.jit``)."""
    decorators = [ast.unparse(d) for d in node.decorator_list]
    return any(d.startswith(("app.command", "plan_app.command", "data_app.command")) or "triton.jit" in d
               for d in decorators)


def many_parameters(paths, root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not exempt_from_parameter_rule(node):
                if parameter_count(node) > MAX_PARAMETERS:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({parameter_count(node)})")
    return found


def test_no_function_with_more_than_8_parameters():
    """Options travel in typed dataclasses (compressor/args.py, search_space/args.py, attention_kernels/options.py),
    not as keyword relays through layers."""
    bad = many_parameters([*modules().values(), *benchmark_files()])
    assert not bad, "functions with more than 8 parameters:\n" + "\n".join(bad)


def test_the_parameter_checker_sees_one_and_exempts_commands_and_kernels(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f(a, b, c, d, e, g, h, i, *rest):\n    pass\n"
                 "def ok(self, a, b, c, d, e, g, h, i):\n    pass\n"
                 "@app.command('x')\ndef cmd(a, b, c, d, e, g, h, i, j):\n    pass\n"
                 "@triton.jit\ndef kern(a, b, c, d, e, g, h, i, j):\n    pass\n")
    assert many_parameters([f], tmp_path) == ["x.py:1 f (9)"]
