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
    """{module: set of flatfast modules it imports anywhere in its source}. An import that names a package
    (``from flatfast.experiments import grid``, ``import flatfast``) runs that package's __init__, so it is an edge
    to the package too; the parents that Python imports implicitly before any submodule are not counted."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from flatfast.backend import native" imports flatfast.backend and flatfast.backend.native;
                # "from flatfast.curvature.trace import f" imports flatfast.curvature.trace
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                           if f"{node.module}.{alias.name}" in modules]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


# The layers of the package, lowest first: a module imports only from lower layers or from its own part.
LAYERS = [
    ("shared", ["flatfast.errors", "flatfast.results", "flatfast._validate", "flatfast._typing",
                "flatfast._progress", "flatfast.reference", "flatfast.optim"]),
    ("beneath the parts", ["flatfast.models", "flatfast.backend"]),
    ("the parts", ["flatfast.curvature", "flatfast.kernel"]),
    ("built on the parts", ["flatfast.prior", "flatfast.measures"]),
    ("the face", ["flatfast", "flatfast.testing"]),
    ("the experiments", ["flatfast.experiments"]),
    ("the command line", ["flatfast.__main__"]),
]


def _place(module):
    """(layer index, part) of a module: the longest prefix among LAYERS' names."""
    best = None
    for index, (_, parts) in enumerate(LAYERS):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and (best is None or len(part) > len(best[1])):
                best = (index, part)
    assert best is not None, f"{module} is in no layer of tests/test_structure.py's LAYERS"
    return best


def test_every_import_runs_downward_and_no_part_reaches_sideways():
    wrong = []
    for module, targets in import_graph().items():
        layer, part = _place(module)
        for target in sorted(targets):
            target_layer, target_part = _place(target)
            if target_part != part and target_layer >= layer:
                wrong.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
    assert not wrong, "\n".join(wrong)


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
    for low_level in ("flatfast.backend.dispatch", "flatfast.backend.native"):
        assert graph[low_level] <= {"flatfast.errors"}, (low_level, graph[low_level])


def test_auto_ranks_the_measured_safe_paths_first_on_cuda():
    """On CUDA tensors 'auto' tries cuBLAS (torch) for the R-operator and Triton for the NNGP kernel before the
    hand-written CUDA C++ kernels, which an H100 measured slower (flatfast/kernel/nngp_backends.py and flatfast/curvature/mlp_rop.py have the figures); on the
    CPU the measured order stands."""
    from flatfast.backend.dispatch import _REGISTRY

    def auto_order(op, device):
        return [impl.name for impl in _REGISTRY[op] if device in (impl.auto_devices or impl.devices)]

    assert auto_order("mlp_hvp", "cuda")[0] == "torch"
    assert auto_order("mlp_hvp", "cuda").index("torch") < auto_order("mlp_hvp", "cuda").index("cuda")
    assert auto_order("mlp_vhv", "cuda")[0] == "torch"
    assert auto_order("nngp", "cuda")[0] == "triton"
    assert auto_order("nngp", "cuda").index("triton") < auto_order("nngp", "cuda").index("cuda")
    assert auto_order("nngp", "cpu")[0] == "cpp" and auto_order("mlp_hvp", "cpu")[0] == "torch"
    assert "triton" not in auto_order("nngp", "cpu")  # Triton runs CPU tensors only under its interpreter


def test_no_module_is_over_450_lines():
    """A module a reader can hold: one idea, split when it grows past this."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
