"""The package's architecture holds: the pipeline never imports the tools, and no module imports
itself back through others (imports inside functions count too)."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "tickettune"


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def test_the_pipeline_never_imports_the_tools():
    graph = import_graph()
    assert any(n.startswith("tickettune.tools.") for n in graph) and any(n.startswith("tickettune.pipeline.") for n in graph)
    offenders = {n: sorted(t for t in deps if t.startswith("tickettune.tools"))
                 for n, deps in graph.items() if n.startswith("tickettune.pipeline")}
    assert not {n: d for n, d in offenders.items() if d}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
