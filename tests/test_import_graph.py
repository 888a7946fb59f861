"""The import graph, read from the source with ``ast`` (nothing is imported).

The layering (README, docs): ``protocol`` is the seam and imports nothing of ours; ``thermo_device``
(the analog side) never imports the host; the host touches ``thermo_device`` in one file,
``host/embedded.py``; and inside ``thermo_device`` no import runs in a circle.

Every import statement counts wherever it sits: at module level, inside a function (a lazy import is
still a dependency), and under ``if TYPE_CHECKING:`` (a type-only import still ties the two modules
together; issue 12 names exactly such a cycle). Dynamic imports by string (the plugin registry's
entry points) are out of reach of a static reading and not counted.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "thermo_device", "host")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a package means its __init__)
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        assert node.module is not None
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    up = node.level - 1
    assert up < len(base), f"relative import beyond the top level in {module} line {node.lineno}"
    base = base[:len(base) - up]
    return ".".join(base + ([node.module] if node.module else []))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Modules an import statement executes, as Python would run it.

    ``import a.b.c`` and ``from a.b import c`` also run the packages ``a`` and ``a.b``; those that
    contain the importing module are already being imported when it runs and add no edge of their
    own. ``from pkg import name`` reaches ``pkg.name`` when that is a module, else ``pkg`` (its
    ``__init__``, where ``name`` is bound): an edge even when ``pkg`` contains the importer, since
    the importer then needs ``pkg/__init__`` to have run far enough to bind ``name``.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = _resolve_from(module, is_package, node)
        names = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in MODULES else base)
    own = set(_parents(module)) | {module}
    for name in names:
        yield from (mod for mod in _parents(name) if mod not in own)
        if name != module:
            yield name


def _edges() -> list[Edge]:
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):  # every level: module, functions, classes, if TYPE_CHECKING
            if isinstance(node, ast.Import | ast.ImportFrom):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                edges.extend(Edge(module, t, where) for t in _targets(module, is_package, node))
    return list(dict.fromkeys(edges))  # one edge per statement and target, however many names it imports


EDGES = _edges()


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(source_pkg: str, forbidden: set[str], allowed_files: set[str] = frozenset()) -> list[str]:
    return [str(e) for e in EDGES
            if _top(e.source) == source_pkg and _top(e.target) in forbidden
            and e.where.split(":")[0] not in allowed_files]


def test_the_reader_sees_the_imports_it_must() -> None:
    """The graph is not empty by accident: known imports, one of each kind, are found."""
    pairs = {(e.source, e.target) for e in EDGES}
    assert ("thermo_device", "thermo_device.emulator") in pairs  # relative, package __init__
    assert ("host.embedded", "thermo_device") in pairs  # function-level, absolute
    assert ("thermo_device.plugins", "thermo_device.emulator") in pairs  # function-level, relative
    assert ("thermo_device.profile", "protocol.errors") in pairs  # module-level, absolute
    assert ("thermo_device.hardware.driver", "thermo_device.hardware") not in pairs  # own package: implicit
    assert ("thermo_device.emulator", "protocol.drift") in pairs or ("thermo_device.emulator", "protocol") in pairs
    assert len(MODULES) > 40


@pytest.mark.parametrize("module,is_package,src,expected", [
    ("a.b.c", False, "from . import x", "a.b"),
    ("a.b.c", False, "from .. import x", "a"),
    ("a.b.c", False, "from ..d import x", "a.d"),
    ("a.b", True, "from .c import x", "a.b.c"),
    ("a.b", True, "from .. import x", "a"),
    ("a.b.c", False, "from e.f import x", "e.f"),
])
def test_relative_imports_resolve(module: str, is_package: bool, src: str, expected: str) -> None:
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve_from(module, is_package, node) == expected


def test_protocol_imports_nothing_of_ours_but_itself() -> None:
    bad = _violations("protocol", {"thermo_device", "host"})
    assert not bad, "protocol must import neither thermo_device nor host:\n" + "\n".join(bad)


def test_thermo_device_never_imports_the_host() -> None:
    bad = _violations("thermo_device", {"host"})
    assert not bad, "thermo_device must not import host:\n" + "\n".join(bad)


def test_host_touches_thermo_device_only_in_embedded() -> None:
    bad = _violations("host", {"thermo_device"}, allowed_files={"host/embedded.py"})
    assert not bad, "host may import thermo_device only in host/embedded.py:\n" + "\n".join(bad)


def _strongly_connected(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in succ.get(v, ()):
                        out.append(sorted(comp))
    return out


def _a_cycle(comp: list[str], by_pair: dict[tuple[str, str], Edge]) -> list[Edge]:
    """One concrete cycle through the component's first module (shortest, by breadth-first search)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for (s, t), e in by_pair.items():
                if s != v or t not in members:
                    continue
                if t == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, prev[path[0].source])
                    return path
                if t not in prev:
                    prev[t] = e
                    nxt.append(t)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strongly connected component


def thermo_device_cycles() -> list[tuple[list[str], list[Edge], list[Edge]]]:
    """Each import cycle: (its modules, one shortest cycle, every import among its modules)."""
    internal = [e for e in EDGES if _top(e.source) == _top(e.target) == "thermo_device"]
    by_pair: dict[tuple[str, str], Edge] = {}
    for e in internal:
        by_pair.setdefault((e.source, e.target), e)
    succ: dict[str, list[str]] = {}
    for s, t in by_pair:
        succ.setdefault(s, []).append(t)
    nodes = sorted(m for m in MODULES if _top(m) == "thermo_device")
    return [(comp, _a_cycle(comp, by_pair), [e for e in internal if e.source in comp and e.target in comp])
            for comp in _strongly_connected(nodes, succ)]


def test_cycle_finder_finds_a_planted_cycle() -> None:
    """The detector itself: a -> b -> c -> a is one component and one reported cycle."""
    succ = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": []}
    comps = _strongly_connected(sorted(succ), succ)
    assert comps == [["a", "b", "c"]]
    by_pair = {(s, t): Edge(s, t, f"{s}.py:1") for s, ts in succ.items() for t in ts}
    assert [(e.source, e.target) for e in _a_cycle(comps[0], by_pair)] == [("a", "b"), ("b", "c"), ("c", "a")]
    assert _strongly_connected(["x"], {"x": ["x"]}) == [["x"]]


def test_no_import_cycle_inside_thermo_device() -> None:
    found = thermo_device_cycles()
    lines = []
    for comp, cycle, among in found:
        lines.append(f"modules in one cycle: {', '.join(comp)}\n  e.g.: " + " | ".join(map(str, cycle))
                     + "\n  every import among them:\n    " + "\n    ".join(map(str, among)))
    assert not found, "import cycles inside thermo_device:\n" + "\n".join(lines)
