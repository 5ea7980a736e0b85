"""The codebase's own rules: no import cycle, function-level imports only for heavy optional dependencies, and
every experiment file composes (lightning-hydra-template's test_sweeps pattern)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose_config

PACKAGES = ("asft_repro", "eval", "data_prep")
# imported inside functions on purpose: optional, heavy, or started only when a backend / logger is chosen
DEFERRED = {"vllm", "deepspeed", "wandb", "peft", "bitsandbytes", "openai", "huggingface_hub"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "fixtures" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at any depth of its code (function-level imports included)."""
    modules = project_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            for target in imported_names(node):
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not target.startswith(name + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if not state.get(nxt) and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_function_level_imports_only_defer_optional_dependencies():
    found = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                for target in imported_names(node)[:1]:
                    if target.split(".")[0] not in DEFERRED:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not found, found


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_composes(name):
    cfg = OmegaConf.to_object(compose_config("config", [f"experiment={name}"]))
    assert cfg.experiment_name and cfg.run_name  # the run name resolves (identity, hash)


@pytest.mark.parametrize("domain,grid", [("math", "table1_math"), ("medical", "table1_medical")])
def test_paper_cells_are_their_grid_plus_method_and_size(domain, grid):
    """Each <domain>_<method>_<size>.yaml composes exactly as its grid with method= and data.size= on top."""
    for method in ("sft", "dft", "asft"):
        for size in ("10k", "30k", "100k"):
            cell = compose_config("config", [f"experiment={domain}_{method}_{size}"])
            swept = compose_config("config", [f"experiment={grid}", f"method={method}", f"data.size={size}"])
            assert OmegaConf.to_container(cell, resolve=True) == OmegaConf.to_container(swept, resolve=True)
    base = OmegaConf.to_object(compose_config("config", [f"experiment={domain}_base"]))
    grid_cfg = OmegaConf.to_object(compose_config("config", [f"experiment={grid}"]))
    assert (base.method.name, base.model, base.eval) == ("base", grid_cfg.model, grid_cfg.eval)
