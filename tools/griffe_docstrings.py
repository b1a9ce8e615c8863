"""A griffe extension for the API reference: our docstrings' conventions rendered as mkdocstrings expects.

Two conventions of the package's docstrings would otherwise render badly (``mkdocs.yml`` loads this for
the API page; the source docstrings are not changed):

- usage examples are titled ``Example:`` (Google style's singular, which griffe renders as a plain
  admonition, reading a doctest's output such as ``['x']`` as a Markdown link): they are parsed as an
  ``Examples:`` section, so the ``>>>`` lines and their output show as code;
- Sphinx roles (``:class:`Client```, ``:meth:`~Client.infer```) show as code (``Client``,
  ``Client.infer``) instead of their raw markup.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|exc|data|obj|const):`~?([^`]+)`")


class DocstringMarkup(Extension):
    """Rewrite each docstring's ``Example:`` title and Sphinx roles before the docstring is parsed."""

    def on_object(self, *, obj: Object, **_: Any) -> None:
        if obj.docstring is not None:
            value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(r"``\1``", value)
