"""The package's imports run one way: no module, through any chain of imports (function-level ones included),
imports itself. A cycle held together by deferred imports is still a cycle: it breaks as soon as someone moves an
import to the top of a file."""
import ast
import pathlib

import flatfast

PACKAGE = pathlib.Path(flatfast.__file__).parent


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: set of flatfast modules it imports anywhere in its source}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from flatfast import _native" imports flatfast._native; "from flatfast.x import f" imports x
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_imports_form_no_cycle():
    graph = import_graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_dispatcher_and_loaders_know_no_clients():
    graph = import_graph()
    for low_level in ("flatfast._dispatch", "flatfast._native"):
        assert graph[low_level] <= {"flatfast.errors"}, (low_level, graph[low_level])


def test_auto_ranks_the_measured_safe_paths_first_on_cuda():
    """On CUDA tensors 'auto' tries cuBLAS (torch) for the R-operator and Triton for the NNGP kernel before the
    hand-written CUDA C++ kernels, which an H100 measured slower (flatfast/_registry.py has the figures); on the
    CPU the measured order stands."""
    import flatfast._registry  # noqa: F401
    from flatfast._dispatch import _REGISTRY

    def auto_order(op, device):
        return [impl.name for impl in _REGISTRY[op] if device in (impl.auto_devices or impl.devices)]

    assert auto_order("mlp_hvp", "cuda")[0] == "torch"
    assert auto_order("mlp_hvp", "cuda").index("torch") < auto_order("mlp_hvp", "cuda").index("cuda")
    assert auto_order("mlp_vhv", "cuda")[0] == "torch"
    assert auto_order("nngp", "cuda")[0] == "triton"
    assert auto_order("nngp", "cuda").index("triton") < auto_order("nngp", "cuda").index("cuda")
    assert auto_order("nngp", "cpu")[0] == "cpp" and auto_order("mlp_hvp", "cpu")[0] == "torch"
    assert "triton" not in auto_order("nngp", "cpu")  # Triton runs CPU tensors only under its interpreter
