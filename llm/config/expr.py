"""Safe evaluation of integer arithmetic such as '2**19' or '8*1024' (never `eval`)."""
import ast
import operator

from .errors import ConfigError

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 256
_ALLOWED = "integer literals, + - * // ** and parentheses"


def eval_int_expr(text: str, field: str = "expression") -> int:
    """Evaluates an integer expression made of integer literals, + - * // ** and parentheses."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(f"{field}={text!r} is not an arithmetic expression; use {_ALLOWED}, e.g. '2**19'") from None
    return _eval(tree.body, text, field)


def _eval(node: ast.AST, text: str, field: str) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, text, field))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, text, field), _eval(node.right, text, field)
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            raise ConfigError(f"{field}={text!r} divides by zero")
        if isinstance(node.op, ast.Pow) and not 0 <= right <= _MAX_EXPONENT:
            raise ConfigError(f"{field}={text!r} has exponent {right}; use an exponent in 0..{_MAX_EXPONENT}")
        return _BINARY[type(node.op)](left, right)
    raise ConfigError(f"{field}={text!r} may only contain {_ALLOWED}, e.g. '2**19' or '8*1024'")
