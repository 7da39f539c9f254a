"""Every public function documents itself with a runnable example; run them all."""
import doctest
import importlib

import pytest

import flatfast

def _public_modules():
    """Every module that defines a public function (flatfast.__all__, and EntropySGD, the one class with an
    example), found from the names, not listed by hand."""
    names = set()
    for name in flatfast.__all__:
        obj = getattr(flatfast, name)
        if isinstance(obj, type) and name != "EntropySGD":
            continue
        module = getattr(obj, "__module__", None)
        if module and module.startswith("flatfast"):
            names.add(module)
    return sorted(names)


MODULES = _public_modules()


def test_the_module_list_covers_the_api():
    assert {"flatfast.empirical", "flatfast.prior", "flatfast.hessian", "flatfast.measures", "flatfast.nngp",
            "flatfast.bounds"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_examples_in_docstrings_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name}: no example ran"
    assert result.failed == 0


def test_every_public_function_has_a_docstring_with_an_example():
    for name in flatfast.__all__:
        obj = getattr(flatfast, name)
        if callable(obj) and not isinstance(obj, type) or name in ("EntropySGD",):
            assert obj.__doc__ and "Example" in obj.__doc__, name
