"""Every public function documents itself with a runnable example; run them all."""
import doctest
import importlib

import pytest

import flatfast

MODULES = ["flatfast.nngp", "flatfast.prior", "flatfast.hessian", "flatfast.measures", "flatfast.optim", "flatfast.bounds",
           "flatfast._registry", "flatfast._native"]


@pytest.mark.parametrize("name", MODULES)
def test_examples_in_docstrings_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_function_has_a_docstring_with_an_example():
    for name in flatfast.__all__:
        obj = getattr(flatfast, name)
        if callable(obj) and not isinstance(obj, type) or name in ("EntropySGD",):
            assert obj.__doc__ and "Example" in obj.__doc__, name
