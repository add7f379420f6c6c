"""Finds a definition, graph or workflow, by its import path ``module:attribute``."""

from __future__ import annotations

import sys
from typing import Any

from saga.definition import Saga, load_ref
from saga.errors import UnknownSagaError
from saga.workflow import Workflow

Definition = Saga | Workflow[Any, Any]


def load_definition(ref: str) -> Definition:
    """Import ``module:attribute`` and return the saga or workflow it names."""
    if ":" not in ref:
        raise UnknownSagaError(f"{ref!r} is not a saga reference: write it as 'module:attribute'")
    value = load_ref(ref)
    if not isinstance(value, Saga | Workflow):
        module_name = ref.partition(":")[0]
        module = sys.modules.get(module_name)
        found = [k for k, v in vars(module or object()).items() if isinstance(v, Saga | Workflow)]
        raise UnknownSagaError(
            f"{ref!r} does not name a saga (found {type(value).__name__}); sagas in "
            f"{module_name!r}: {found}"
        )
    return value
