"""A griffe extension: document chosen objects from the imported module instead of its source.

Static analysis sees ``LowRankAdam = _make(torch.optim.Adam, …)`` as an attribute; the
object it makes at run time is a class with a docstring and a signature. mkdocs.yml names
such objects::

    extensions:
      - docs/griffe_runtime.py:RuntimeObjects:
          paths: [tensorlotr.optim.LowRankAdam]
"""

from __future__ import annotations

from typing import Any

import griffe


class RuntimeObjects(griffe.Extension):
    """Replace each named object of a loaded package by what ``griffe.inspect`` finds at run time."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = list(paths)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        inspected: dict[str, griffe.Module] = {}
        for path in self.paths:
            module_path, name = path.rsplit(".", 1)
            if module_path.split(".", 1)[0] != pkg.name:
                continue
            if module_path not in inspected:
                inspected[module_path] = griffe.inspect(
                    module_path,
                    docstring_parser=loader.docstring_parser,
                    docstring_options=loader.docstring_options,
                )
            module = pkg.modules_collection[module_path]
            runtime = inspected[module_path][name]
            runtime.lineno = module[name].lineno
            runtime.endlineno = module[name].endlineno
            module.set_member(name, runtime)
