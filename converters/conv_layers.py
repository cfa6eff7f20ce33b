"""A safe parser for fairseq's ``conv_feature_layers`` strings.

fairseq (and torchaudio's import) ``eval`` strings such as ``"[(512,10,5)] + [(512,3,2)] * 4"``. Here the
string is parsed with :mod:`ast` and only list/tuple literals of integers, ``+`` of lists and
``list * int`` are accepted; nothing is evaluated.
"""

from __future__ import annotations

import ast

ConvLayer = tuple[int, int, int]


class ConvLayersSyntaxError(ValueError):
    pass


def _value(node: ast.AST, text: str) -> object:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, text) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _value(node.left, text), _value(node.right, text)
        if isinstance(left, list) and isinstance(right, list):
            return left + right
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        left, right = _value(node.left, text), _value(node.right, text)
        if isinstance(left, list) and type(right) is int and 0 <= right <= 1000:
            return left * right
        if type(left) is int and isinstance(right, list) and 0 <= left <= 1000:
            return right * left
    raise ConvLayersSyntaxError(
        f"conv_feature_layers {text!r}: only lists of (dim, kernel, stride) integer tuples joined with '+' "
        "and repeated with '* N' are accepted"
    )


def parse_conv_layers(text: str) -> list[ConvLayer]:
    """``"[(512,10,5)] + [(512,3,2)] * 4"`` -> ``[(512, 10, 5), (512, 3, 2), ...]``."""
    try:
        tree = ast.parse(str(text).strip(), mode="eval")
    except SyntaxError as exc:
        raise ConvLayersSyntaxError(f"conv_feature_layers {text!r} is not a list expression") from exc
    value = _value(tree.body, text)
    if not isinstance(value, list) or not value:
        raise ConvLayersSyntaxError(f"conv_feature_layers {text!r} does not describe any layer")
    layers: list[ConvLayer] = []
    for item in value:
        if not (isinstance(item, tuple) and len(item) == 3 and all(type(v) is int and v > 0 for v in item)):
            raise ConvLayersSyntaxError(
                f"conv_feature_layers {text!r}: each layer must be (dim, kernel, stride) with positive integers"
            )
        layers.append(item)
    return layers
