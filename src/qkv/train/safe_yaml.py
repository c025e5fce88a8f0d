"""YAML that may be hostile: bounded parsing, and values shown in messages without expanding them.

A few lines of YAML can describe a huge structure through aliases (the "billion laughs": ``a: &a [x, x]``,
``b: &b [*a, *a]``, ... doubles at every line). PyYAML builds it cheaply, every alias pointing to the same
object, but anything that walks it (``repr`` in an error message, ``==``, dumping) takes exponential time
and memory. :func:`load_yaml` counts the nodes of the document as it would be with every alias expanded and
refuses one beyond :data:`MAX_EXPANDED_NODES`; :func:`short_repr` (from :mod:`qkv.checks`, re-exported here)
shows a value in a message with a bounded amount of work whatever its size.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# short_repr lives in the bottom layer so that every layer can bound the values in its messages.
from qkv.checks import MESSAGE_CHARS, short_repr

# A full reference config is a few hundred nodes; this leaves room for long lists yet stops alias bombs.
MAX_EXPANDED_NODES = 100_000


class YAMLTooLargeError(yaml.YAMLError):
    """A YAML document whose alias-expanded size is beyond :data:`MAX_EXPANDED_NODES` nodes."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], limit: int) -> int:
    """Nodes of ``node`` with every alias expanded, counted up to just past ``limit`` (memoised by node)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = limit + 1  # a node met again while being counted is a cycle: infinitely large
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, limit)
        if total > limit:
            break
    sizes[id(node)] = min(total, limit + 1)
    return sizes[id(node)]


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents beyond :data:`MAX_EXPANDED_NODES` expanded nodes."""

    def construct_document(self, node: yaml.Node) -> Any:
        try:
            size = _expanded_size(node, {}, MAX_EXPANDED_NODES)
        except RecursionError:
            size = MAX_EXPANDED_NODES + 1
        if size > MAX_EXPANDED_NODES:
            raise YAMLTooLargeError(
                f"the document expands to more than {MAX_EXPANDED_NODES:,} values once its aliases (*name) are "
                "resolved; expected a configuration of ordinary size"
            )
        return super().construct_document(node)


# YAML 1.1 (PyYAML) reads an exponent without a dot ("5e-4", "1E+3") as a string; YAML 1.2 and every
# reader of a learning-rate setting mean a number.
BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing alias-expanded documents beyond :data:`MAX_EXPANDED_NODES` nodes,
    and reading ``5e-4`` as the number it is.

    Raises:
        YAMLTooLargeError: the document is too large once expanded.
        yaml.YAMLError: it is not valid YAML.
    """
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (BoundedLoader is a SafeLoader)


__all__ = ["MAX_EXPANDED_NODES", "MESSAGE_CHARS", "BoundedLoader", "YAMLTooLargeError", "load_yaml", "short_repr"]
