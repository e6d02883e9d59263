"""The backend Protocol is the whole contract: each backend has exactly its members, and
nothing outside backends/ calls anything else or branches on a backend's name (that only
backends/ imports a framework is tests/test_imports.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lorafit.backends import base

ROOT = Path(base.__file__).resolve().parents[1]


def protocol_members(proto) -> set:
    body = vars(proto)
    names = {k for k, v in body.items() if not k.startswith("_") and (callable(v) or
                                                                        isinstance(v, property))}
    return names | {k for k in getattr(proto, "__annotations__", {}) if not k.startswith("_")}


def public_members(obj) -> set:
    cls = type(obj)
    names = {k for c in cls.__mro__ if c is not object for k in vars(c) if not k.startswith("_")}
    return names | {k for k in vars(obj) if not k.startswith("_")}


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_backend_has_exactly_the_protocol_members(name):
    from lorafit.backends import get_backend

    ops = get_backend(name, "cpu")
    wanted, have = protocol_members(base.Backend), public_members(ops)
    assert not wanted - have, f"{name} lacks {sorted(wanted - have)}"
    assert not have - wanted, f"{name} has members the Protocol does not declare: " \
                              f"{sorted(have - wanted)}"
    assert isinstance(ops, base.Backend)


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_optimizer_has_exactly_the_protocol_members(name):
    from lorafit.backends import get_backend

    ops = get_backend(name, "cpu")
    opt = ops.make_optimizer({"w": ops.zeros((2, 2))})
    wanted = protocol_members(base.Optimizer)
    have = {k for k in dir(type(opt)) if not k.startswith("_") and callable(getattr(opt, k))}
    have |= {k for k in wanted if k in base.Optimizer.__annotations__ and hasattr(opt, k)}
    assert wanted <= have and not (have - wanted), sorted(have ^ wanted)


def package_modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "build") or rel.parts[0].startswith("."):
            continue
        yield rel, path


def test_no_branching_on_backend_names_outside_backends():
    """`ops.name == "mlx"` and the like belong inside backends/; elsewhere the name is
    only printed or recorded."""
    for rel, path in package_modules():
        if rel.parts[0] == "backends":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                attr = any(isinstance(p, ast.Attribute) and p.attr == "name" for p in parts)
                lit = any(isinstance(p, ast.Constant) and p.value in ("torch", "mlx")
                          for p in parts)
                assert not (attr and lit), \
                    f"{rel}:{node.lineno} branches on a backend's name"


def test_no_defensive_getattr_on_the_backend():
    for rel, path in package_modules():
        src = path.read_text()
        for needle in ("getattr(ops", "getattr(self.ops", "getattr(backend", "getattr(B,",
                       "getattr(self.B"):
            assert needle not in src, f"{rel} reads the backend with {needle}...)"
