"""Type aliases of the public API's annotations. Annotations are never evaluated at run time (every public module
has ``from __future__ import annotations``), so naming torch here costs nothing to ``import flatfast``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    import numpy
    import torch

    Model = torch.nn.Module
    Tensor = torch.Tensor
    # What params= takes: parameters, their names, (name, parameter) pairs or modules, alone or in an iterable.
    ParamsLike = Union[torch.Tensor, str, torch.nn.Module, Iterable[Union[torch.Tensor, str, torch.nn.Module,
                                                                             tuple]]]
    ArrayLike = Union[numpy.ndarray, torch.Tensor, Sequence[Any]]
    InputsLike = Union[numpy.ndarray, torch.Tensor, Mapping[str, torch.Tensor]]

Loader = Iterable[Any]
LossFn = Callable[[Any, Any], Any]
BatchFn = Callable[[Any], Any]

__all__ = ["ArrayLike", "BatchFn", "InputsLike", "Loader", "LossFn", "Model", "Optional", "ParamsLike", "Tensor"]
