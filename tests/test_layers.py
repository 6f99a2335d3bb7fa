"""Import layering of the package, read from the source with ``ast`` (nothing is imported).

Every module under ``rectrain/`` belongs to a layer (below); a module may import its own layer
and the layers below it, never one above, so there is no import cycle between layers, and no
cycle between modules either. Only the layers that run Ray may import ``ray``. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: bottom to top. ``compat``: the one place for torch/torchrec/fbgemm version differences;
#: ``serve``: inference (rectrain/serve/: recommend, export)
LAYERS = ["rectrain", "compat", "config", "data.storage", "data", "models", "checkpoint", "train", "serve",
          "launch", "bench", "cli"]
#: layers that may import ray: data (Ray Data / Ray task stages of prepare and synth, the text
#: embedding stage), launch (the only place that starts Ray and runs Ray Train), bench, cli
RAY_LAYERS = {"data", "launch", "bench", "cli"}

#: (importing module, imported layer) edges allowed against the rules: none
KNOWN_LAYER_EXCEPTIONS: set[tuple[str, str]] = set()
#: module cycles allowed: none
KNOWN_CYCLES: set[frozenset] = set()


def _modules() -> dict[str, str]:
    """``{dotted module name: file path}`` of every module under rectrain/."""
    out = {}
    for root, _, files in os.walk(os.path.join(ROOT, "rectrain")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def layer(module: str) -> str:
    """The layer of a dotted ``rectrain...`` module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "rectrain"
    if parts[1] == "data" and len(parts) > 2 and parts[2] == "storage":
        return "data.storage"
    return parts[1]


def imports(path: str, mods: dict[str, str]) -> set[str]:
    """Absolute module names imported anywhere in the file (``from a import b`` gives ``a.b``
    when that is a module, else ``a``; relative imports are resolved too)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    pkg = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in mods else base)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: imports(p, mods) for m, p in mods.items()}


def test_every_module_has_a_known_layer():
    assert {layer(m) for m in graph()} <= set(LAYERS)


def test_each_layer_imports_only_the_layers_below():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for mod, targets in graph().items():
        for t in targets:
            if t.split(".")[0] != "rectrain" or rank[layer(t)] <= rank[layer(mod)]:
                continue
            if (mod, layer(t)) in KNOWN_LAYER_EXCEPTIONS:
                continue
            bad.append(f"{mod} ({layer(mod)}) imports {t} ({layer(t)})")
    assert bad == [], "imports of a higher layer:\n" + "\n".join(sorted(bad))


def test_ray_is_imported_only_where_ray_runs():
    bad = sorted(f"{m} ({layer(m)}) imports {t}" for m, ts in graph().items() for t in ts
                 if t.split(".")[0] == "ray" and layer(m) not in RAY_LAYERS)
    assert bad == [], "ray outside data/launch/bench/cli:\n" + "\n".join(bad)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(g.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter[0]
                counter[0] += 1
                stack.append(nxt)
                on.add(nxt)
                work.append((nxt, iter(sorted(g.get(nxt, ())))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    g = graph()
    mods = set(g)
    module_graph = {m: {t for t in ts if t in mods and t != m} for m, ts in g.items()}
    cycles = [c for c in _cycles(module_graph) if frozenset(c) not in KNOWN_CYCLES]
    assert cycles == [], f"module import cycles: {cycles}"
    layers = {}
    for m, ts in module_graph.items():
        layers.setdefault(layer(m), set()).update(
            layer(t) for t in ts if layer(t) != layer(m)
            and (m, layer(t)) not in KNOWN_LAYER_EXCEPTIONS)
    assert _cycles(layers) == []


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path):
    """The helpers above find a two-module cycle and an import inside a function."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rectrain.cli import main\n    import ray.data\n")
    assert imports(str(f), {}) == {"rectrain.cli", "ray.data"}
