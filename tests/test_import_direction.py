"""The import direction of the layout (style.md §2), read from the source like trio's test_exports.

- ``lb`` never imports ``backends`` or ``quiclb_harness``: the load balancer does
  not depend on the servers behind it or on test infrastructure (``quiclb demo``
  reaches the harness through an entry point, not an import).
- ``lb.core`` is sans-IO: no ``socket``, ``asyncio``, ``selectors``, ``signal``
  or ``time``, and nothing from ``lb.adapters``, ``lb.control``, ``lb.app``, ``lb.cli``.
- ``lb.adapters`` and ``lb.control`` do not import each other; ``lb.app`` wires them.
- ``backends`` takes from ``lb`` only the shared wire and address kit.

Every import counts: module level, inside functions (a lazy import is still a
dependency) and under ``TYPE_CHECKING`` (a type-only one couples the layers too).
Known exceptions are listed by (importing module, imported module) with the
reason; one that no longer occurs fails the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lb", "backends", "quiclb_harness")

#: What lb.core must not import: I/O, clocks and signals (time arrives as ``now``).
CORE_FORBIDDEN_STDLIB = frozenset({"socket", "asyncio", "selectors", "signal", "time"})
CORE_FORBIDDEN_LB = ("lb.adapters", "lb.control", "lb.app", "lb.cli")

#: The wire and address kit ``backends`` shares with the load balancer.
BACKENDS_MAY_IMPORT = frozenset({
    "lb.core.addresses",
    "lb.core.cid_cipher",
    "lb.core.cid_config",
    "lb.core.cid_decoder",
    "lb.core.cid_encoder",
    "lb.core.cid_issuer",
    "lb.core.encapsulation",
    "lb.core.quic_constants",
    "lb.core.quic_header",
    "lb.core.rate_limit",  # the per-source limit on resets (acceptance A-4), the same on both sides
    "lb.core.retry_token",  # the shared-state Retry token format (issue 9)
    "lb.core.stateless_packets",  # Retry and reset packets, reset token derivation
    "lb.errors",
})

#: Known exceptions, each with its reason; remove an entry when its import goes.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # The backend reads the deployment's one TOML file (design §5) with the LB's parser,
    # so both sides validate it identically. A shared config reader outside lb.control
    # would lift this; until then it is the one non-wire dependency.
    ("backends.cli", "lb.control.config"): "backends read the shared configuration file",
    ("backends.settings", "lb.control.config"): "type-only: BackendSettings.from_lb_config(LbConfig)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, absolute; ``from a import b`` yields ``a`` and ``a.b``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            # ``from lb.core import router`` imports lb.core.router: name the submodule too.
            yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def all_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = set(imports_of(path))
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(imports: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs that break a rule in the module docstring."""
    bad: set[tuple[str, str]] = set()
    for importer, targets in imports.items():
        for target in targets:
            top = target.split(".")[0]
            if within(importer, "lb") and top in ("backends", "quiclb_harness"):
                bad.add((importer, target))
            if within(importer, "lb.core") and (
                top in CORE_FORBIDDEN_STDLIB or any(within(target, p) for p in CORE_FORBIDDEN_LB)
            ):
                bad.add((importer, target))
            if within(importer, "lb.adapters") and within(target, "lb.control"):
                bad.add((importer, target))
            if within(importer, "lb.control") and within(target, "lb.adapters"):
                bad.add((importer, target))
            if within(importer, "backends") and top == "lb" and not _is_shared_kit(target):
                bad.add((importer, target))
    return bad


def _is_shared_kit(target: str) -> bool:
    # ``from lb.errors import MalformedDatagram`` also yields ``lb.errors.MalformedDatagram``.
    return any(within(target, allowed) for allowed in BACKENDS_MAY_IMPORT)


def excused(importer: str, target: str) -> bool:
    """A known exception covers its module and the names imported from it."""
    return any(importer == known and within(target, module) for known, module in KNOWN_EXCEPTIONS)


def test_the_layers_import_in_one_direction() -> None:
    found = violations(all_imports())
    unexpected = sorted(pair for pair in found if not excused(*pair))
    assert not unexpected, "imports against the layout (style.md §2):\n" + "\n".join(
        f"  {importer} imports {target}" for importer, target in unexpected
    )


def test_known_exceptions_still_occur() -> None:
    found = violations(all_imports())
    gone = sorted(pair for pair in KNOWN_EXCEPTIONS if pair not in found)
    assert not gone, f"no longer imported, remove from KNOWN_EXCEPTIONS: {gone}"


@pytest.mark.parametrize(
    ("importer", "target", "bad"),
    [
        ("lb.core.router", "time", True),
        ("lb.core.router", "lb.control.config", True),
        ("lb.core.router", "lb.core.maglev", False),
        ("lb.adapters.udp_socket", "lb.control.keys", True),
        ("lb.cli", "quiclb_harness.demo", True),
        ("lb.app", "lb.control.config", False),
        ("backends.server", "lb.core.encapsulation", False),
        ("backends.server", "lb.core.router", True),
        ("backends.server", "lb.errors.MalformedDatagram", False),
        ("quiclb_harness.demo", "backends.client", False),
    ],
)
def test_the_rules_themselves(importer: str, target: str, bad: bool) -> None:
    assert (violations({importer: {target}}) == {(importer, target)}) is bad


def test_every_package_was_read() -> None:
    names = all_imports()
    for package in PACKAGES:
        assert package in names, f"{package}/__init__.py not found under {ROOT}"
