"""Every public function documents itself with a runnable example; run them all."""
import doctest
import importlib

import pytest

import flatfast

def _public_modules():
    """Every module that defines a public name with an example (flatfast.__all__ but the errors and warnings),
    found from the names, not listed by hand."""
    names = set()
    for name in flatfast.__all__:
        obj = getattr(flatfast, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            continue
        module = getattr(obj, "__module__", None)
        if module and module.startswith("flatfast"):
            names.add(module)
    return sorted(names)


MODULES = _public_modules()


def test_the_module_list_covers_the_api():
    assert {"flatfast.curvature.hessian", "flatfast.curvature.trace", "flatfast.kernel.nngp", "flatfast.kernel.empirical",
            "flatfast.prior.evidence", "flatfast.measures.flatness", "flatfast.measures.bounds",
            "flatfast.results"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES + ["flatfast.experiments.config", "flatfast.experiments.grid"])
def test_examples_in_docstrings_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: no example ran"
    assert result.failed == 0


def test_every_public_name_has_a_docstring_with_an_example():
    """Functions and result types show an example; errors and warnings say when they are raised and what to do."""
    for name in flatfast.__all__:
        obj = getattr(flatfast, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert obj.__doc__ and ("Raised" in obj.__doc__ or "Issued" in obj.__doc__), name
            assert "What to do" in obj.__doc__, name
        else:
            assert obj.__doc__ and "Example" in obj.__doc__, name


def test_public_docstrings_hold_no_control_characters():
    """A LaTeX command such as \\theta or \\approx in a docstring that is not a raw string becomes a tab or a bell
    character, which renders as garbage in the API reference."""
    import re

    for name in flatfast.__all__:
        doc = getattr(flatfast, name).__doc__ or ""
        # \t (\x09) included: "\theta" and "\tau" in a non-raw docstring become a tab and "heta", "au"
        assert not re.search(r"[\x00-\x09\x0b-\x1f]", doc), (name, re.findall(r".{0,20}[\x00-\x09\x0b-\x1f]", doc))


def test_every_public_function_is_annotated():
    """Type hints on the public API (flatfast ships a py.typed marker): every parameter and the return value."""
    import inspect
    import pathlib

    assert (pathlib.Path(flatfast.__file__).parent / "py.typed").exists()
    for name in flatfast.__all__:
        obj = getattr(flatfast, name)
        if isinstance(obj, type) or not callable(obj):
            continue
        signature = inspect.signature(obj)
        missing = [p for p, v in signature.parameters.items() if v.annotation is inspect.Parameter.empty]
        assert not missing, (name, missing)
        assert signature.return_annotation is not inspect.Signature.empty, name


def test_the_api_reference_lists_every_public_name():
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.rst").read_text()
    listed = set(re.findall(r"^   (\w+)$", page, flags=re.M))
    assert set(flatfast.__all__) <= listed, sorted(set(flatfast.__all__) - listed)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's example of the headline calls is the contract a newcomer reads first: it runs as written."""
    import pathlib
    import re

    import matplotlib

    matplotlib.use("Agg")
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_cross_references_lead_somewhere():
    """Every :func:, :class:, :meth:, :mod: or :attr: reference in flatfast's source names something that exists:
    absolutely, under flatfast, in its own module, or (a method or attribute) on one of that module's classes."""
    import inspect
    import pkgutil
    import re

    role = re.compile(r":(?:func|class|meth|mod|attr|data|exc):`~?([^`<]+?)`")

    def found(name, module):
        for candidate in (name, f"flatfast.{name}", f"{module.__name__}.{name}"):
            parts = candidate.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for part in parts[cut:]:
                        obj = getattr(obj, part)
                    return True
                except AttributeError:
                    break
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        return "." not in name and any(hasattr(c, name) for c in classes)

    missing = []
    for info in pkgutil.walk_packages(flatfast.__path__, "flatfast."):
        module = importlib.import_module(info.name)
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):  # the compiled extension
            continue
        missing += [f"{info.name}: {name}" for name in role.findall(source) if not found(name.strip(), module)]
    assert not missing, "references that lead nowhere: " + ", ".join(missing)

