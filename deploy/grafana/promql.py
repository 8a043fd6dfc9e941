"""A small PromQL subset: parse the dashboard's and alerts' queries, and evaluate them over recorded scrapes.

Supported: selectors with =, !=, =~, !~ matchers and [range]; rate, increase, histogram_quantile; sum/max/min/avg/
count with `by (...)` before the body; + - * / and comparisons between vectors and numbers (one-to-one matching,
optional on/ignoring); and, or, unless. Not supported (a clear ParseError): offsets, subqueries, `by` after the
body, group_left/right. Differences from Prometheus, on purpose: rate/increase do not extrapolate to the window's
edges, and instant lookups look back at most LOOKBACK_S.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

LOOKBACK_S = 300.0
Labels = frozenset  # of (name, value) pairs
Vector = dict  # Labels -> float


class ParseError(ValueError):
    pass


@dataclass
class Number:
    value: float


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)
    range_s: float | None = None


@dataclass
class Call:
    func: str
    args: list


@dataclass
class Agg:
    op: str
    by: list[str] | None
    expr: object


@dataclass
class Binary:
    op: str
    lhs: object
    rhs: object
    on: list[str] | None = None        # match on these labels only
    ignoring: list[str] | None = None  # match on all labels but these


AGGREGATIONS = {"sum", "max", "min", "avg", "count"}
FUNCTIONS = {"rate", "increase", "histogram_quantile"}
BINDING = {"or": 1, "and": 2, "unless": 2, "==": 3, "!=": 3, ">": 3, "<": 3, ">=": 3, "<=": 3,
           "+": 4, "-": 4, "*": 5, "/": 5}
TOKEN = re.compile(r'\s*(?:(?P<dur>\d+(?:ms|s|m|h|d|w)(?![a-zA-Z0-9_]))|(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)'
                   r'|(?P<str>"(?:[^"\\]|\\.)*")|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*)'
                   r'|(?P<op>=~|!~|==|!=|>=|<=|[-+*/(){}\[\],=<>]))')
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        m = TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected {text[pos:pos + 12]!r} at {pos} in {text!r}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise ParseError(f"unexpected end of {self.text!r}" + (f", expected {expected!r}" if expected else ""))
        tok = self.tokens[self.i]
        if expected is not None and tok[1] != expected:
            raise ParseError(f"expected {expected!r}, got {tok[1]!r} in {self.text!r}")
        self.i += 1
        return tok

    def parse(self) -> object:
        node = self.expr(0)
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()!r} in {self.text!r}")
        return node

    def expr(self, min_bp: int) -> object:
        lhs = self.primary()
        while (op := self.peek()) in BINDING and BINDING[op] > min_bp:
            self.take()
            node = Binary(op, lhs, None)
            if self.peek() in ("on", "ignoring"):
                setattr(node, self.take()[1], self.label_list())
            node.rhs = self.expr(BINDING[op])
            lhs = node
        return lhs

    def label_list(self) -> list[str]:
        self.take("(")
        labels = []
        while self.peek() != ")":
            labels.append(self.take()[1])
            if self.peek() == ",":
                self.take()
        self.take(")")
        return labels

    def primary(self) -> object:
        kind, tok = self.take()
        if kind == "num":
            return Number(float(tok))
        if tok == "-":
            return Binary("*", Number(-1.0), self.primary())
        if tok == "(":
            inner = self.expr(0)
            self.take(")")
            return inner
        if kind != "id":
            raise ParseError(f"unexpected {tok!r} in {self.text!r}")
        if tok in AGGREGATIONS:
            by = None
            if self.peek() == "by":
                self.take()
                by = self.label_list()
            self.take("(")
            body = self.expr(0)
            self.take(")")
            if self.peek() in ("by", "without"):
                raise ParseError(f"put `by (...)` before the body of {tok}() in {self.text!r}")
            return Agg(tok, by, body)
        if tok in FUNCTIONS:
            self.take("(")
            args = [self.expr(0)]
            while self.peek() == ",":
                self.take()
                args.append(self.expr(0))
            self.take(")")
            return Call(tok, args)
        return self.selector(tok)

    def selector(self, name: str) -> Selector:
        sel = Selector(name)
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label = self.take()[1]
                op = self.take()[1]
                kind, value = self.take()
                if op not in ("=", "!=", "=~", "!~") or kind != "str":
                    raise ParseError(f"bad matcher {label}{op}{value} in {self.text!r}")
                sel.matchers.append((label, op, value[1:-1].encode().decode("unicode_escape")))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        if self.peek() == "[":
            self.take()
            kind, dur = self.take()
            if kind != "dur":
                raise ParseError(f"bad range {dur!r} in {self.text!r}")
            self.take("]")
            sel.range_s = float(dur[:-2]) * UNITS["ms"] if dur.endswith("ms") else float(dur[:-1]) * UNITS[dur[-1]]
        return sel


def parse(text: str) -> object:
    return Parser(text).parse()


def walk(node: object):
    """Every node of a parsed query, depth first."""
    yield node
    children = {Call: lambda n: n.args, Agg: lambda n: [n.expr], Binary: lambda n: [n.lhs, n.rhs]}
    for kind, get in children.items():
        if isinstance(node, kind):
            for child in get(node):
                yield from walk(child)


def matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        ok = {"=": have == value, "!=": have != value}.get(op)
        if ok is None:
            ok = re.fullmatch(value, have) is not None
            ok = ok if op == "=~" else not ok
        if not ok:
            return False
    return True


class SeriesStore:
    """Samples by series, from recorded scrapes: (metric name, labels) -> sorted (time, value) lists."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, Labels], tuple[list[float], list[float]]] = {}

    def add(self, t: float, name: str, labels: dict[str, str], value: float) -> None:
        times, values = self.series.setdefault((name, Labels(labels.items())), ([], []))
        at = bisect.bisect(times, t)
        times.insert(at, t)
        values.insert(at, value)

    def select(self, sel: Selector):
        for (name, labels), samples in self.series.items():
            if name == sel.name and matches(dict(labels), sel.matchers):
                yield labels, samples


def _increase(times: list[float], values: list[float], start: float, end: float) -> tuple[float, float] | None:
    """Counter increase over the samples in (start, end] and the time they span; resets count from zero."""
    lo, hi = bisect.bisect_right(times, start), bisect.bisect_right(times, end)
    if hi - lo < 2:
        return None
    total = 0.0
    for prev, cur in zip(values[lo:hi - 1], values[lo + 1:hi], strict=True):
        total += cur - prev if cur >= prev else cur
    return total, times[hi - 1] - times[lo]


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile on one series' cumulative buckets (linear inside a bucket)."""
    buckets.sort()
    if not buckets or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == math.inf:
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _drop_name(labels: Labels) -> Labels:
    return Labels((k, v) for k, v in labels if k != "__name__")


def _arith(op: str, a: float, b: float) -> float:
    if op == "/":
        return a / b if b else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a))
    return {"+": a + b, "-": a - b, "*": a * b}[op]


COMPARE = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">": lambda a, b: a > b,
           "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


class Evaluator:
    """Instant evaluation of a parsed query at time t (seconds) over a SeriesStore."""

    def __init__(self, store: SeriesStore):
        self.store = store

    def eval(self, node: object, t: float):
        kind = type(node).__name__
        return getattr(self, f"_{kind.lower()}")(node, t)

    def _number(self, node: Number, t: float) -> float:
        return node.value

    def _selector(self, node: Selector, t: float) -> Vector:
        if node.range_s is not None:
            raise ValueError(f"range selector {node.name}[...] needs rate() or increase()")
        out: Vector = {}
        for labels, (times, values) in self.store.select(node):
            at = bisect.bisect_right(times, t) - 1
            if at >= 0 and t - times[at] <= LOOKBACK_S:
                out[labels | {("__name__", node.name)}] = values[at]
        return out

    def _call(self, node: Call, t: float) -> Vector:
        if node.func == "histogram_quantile":
            q, vec = self.eval(node.args[0], t), self.eval(node.args[1], t)
            groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
            for labels, value in vec.items():
                le = dict(labels).get("le")
                if le is not None:
                    groups[Labels((k, v) for k, v in labels if k not in ("le", "__name__"))].append((float(le), value))
            return {labels: _quantile(q, buckets) for labels, buckets in groups.items()}
        sel = node.args[0]
        if not isinstance(sel, Selector) or sel.range_s is None:
            raise ValueError(f"{node.func}() takes a range selector, like {node.func}(metric[5m])")
        out: Vector = {}
        for labels, (times, values) in self.store.select(sel):
            got = _increase(times, values, t - sel.range_s, t)
            if got is not None and got[1] > 0:
                out[_drop_name(labels)] = got[0] / got[1] if node.func == "rate" else got[0]
        return out

    def _agg(self, node: Agg, t: float) -> Vector:
        groups: dict[Labels, list[float]] = defaultdict(list)
        for labels, value in self.eval(node.expr, t).items():
            keep = node.by or []
            groups[Labels((k, v) for k, v in labels if k in keep)].append(value)
        reduce = {"sum": sum, "max": max, "min": min, "count": len, "avg": lambda xs: sum(xs) / len(xs)}[node.op]
        return {labels: float(reduce(values)) for labels, values in groups.items()}

    def _key(self, node: Binary, labels: Labels) -> Labels:
        if node.on is not None:
            return Labels((k, v) for k, v in labels if k in node.on)
        return Labels((k, v) for k, v in labels if k != "__name__" and k not in (node.ignoring or []))

    def _set_op(self, node: Binary, lhs: Vector, rhs: Vector) -> Vector:
        rhs_keys = {self._key(node, labels) for labels in rhs}
        if node.op == "or":
            lhs_keys = {self._key(node, labels) for labels in lhs}
            return {**{k: v for k, v in rhs.items() if self._key(node, k) not in lhs_keys}, **lhs}
        keep = node.op == "and"
        return {labels: v for labels, v in lhs.items() if (self._key(node, labels) in rhs_keys) == keep}

    def _binary(self, node: Binary, t: float):
        lhs, rhs = self.eval(node.lhs, t), self.eval(node.rhs, t)
        if node.op in ("and", "or", "unless"):
            return self._set_op(node, lhs, rhs)
        scalar_l, scalar_r = not isinstance(lhs, dict), not isinstance(rhs, dict)
        if scalar_l and scalar_r:
            return float(COMPARE[node.op](lhs, rhs)) if node.op in COMPARE else _arith(node.op, lhs, rhs)
        if scalar_l or scalar_r:
            vec, other = (rhs, lhs) if scalar_l else (lhs, rhs)
            pairs = {labels: ((other, v) if scalar_l else (v, other)) for labels, v in vec.items()}
        else:
            right = {self._key(node, labels): v for labels, v in rhs.items()}
            pairs = {labels: (v, right[self._key(node, labels)]) for labels, v in lhs.items()
                     if self._key(node, labels) in right}
        if node.op in COMPARE:
            return {labels: a if scalar_r or not scalar_l else b for labels, (a, b) in pairs.items()
                    if COMPARE[node.op](a, b)}
        return {_drop_name(labels): _arith(node.op, a, b) for labels, (a, b) in pairs.items()}
