"""A message never suggests a flag that does not exist: every ``--flag`` written in a string of the code (error
messages, hints, notes) is an option of one of the four CLIs' parsers, or a named flag of another tool."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*")

#: Flags of other programs that messages legitimately mention (torchrun, pip, pytest, git...).
OTHER_TOOLS = {
    "--nproc_per_node", "--nproc-per-node", "--nnodes", "--node_rank", "--node-rank", "--master_addr",
    "--master-addr", "--master_port", "--master-port", "--rdzv_endpoint", "--rdzv-endpoint", "--rdzv_backend",
    "--rdzv-backend", "--rdzv_id", "--standalone", "--user", "--upgrade", "--index-url", "--extra-index-url",
    "--no-build-isolation", "--gpus", "--ipc", "--shm-size", "--deepspeed", "--local_rank", "--local-rank",
    "--runxfail", "--gpu-ids", "--format", "--query-gpu", "--help", "--local-dir", "--ntasks-per-node",
    "--porcelain", "--untracked-files", "--no-optional-locks",
    "--version",  # the C++ compiler check before DeepSpeed JIT-builds CPU Adam (c++ --version)
    "--config",  # the training launcher's own entry point (python -m phi3v_core.training.launch --config run.json)
    "--layers",  # selfcheck's per-check worker (python -m bench.selfcheck --config ... --layers N)
    "--collect-only",  # pytest's (the README's GPU-test count is rendered from pytest -m gpu --collect-only)
    "--readme",  # the README renderer's own flag (python -m bench.readme render --readme PATH)
}  # fmt: skip


def _parsers() -> list[argparse.ArgumentParser]:
    from bench.cli import build_parser as bench_parser
    from bench.packing_measure import build_parser as packing_measure_parser
    from phi3v_core.cli.convert import build_parser as convert_parser
    from phi3v_core.cli.finetune import build_parser as finetune_parser
    from planner.cli import build_parser as plan_parser

    return [bench_parser(), plan_parser(), finetune_parser(), convert_parser(), packing_measure_parser()]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:  # argparse has no public walker over its actions
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def _flags_in_strings(path: Path) -> set[str]:
    """Flags in the string literals of ``path`` (docstrings left out: they may quote a typo as an example)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.update(FLAG_RE.findall(node.value))
    return found


def test_every_flag_a_message_names_exists() -> None:
    known = set().union(*(_options(p) for p in _parsers())) | OTHER_TOOLS
    missing = {}
    for package in ("phi3v_core", "bench", "planner"):
        for path in sorted((ROOT / package).rglob("*.py")):
            unknown = _flags_in_strings(path) - known
            if unknown:
                missing[str(path.relative_to(ROOT))] = sorted(unknown)
    assert not missing, f"messages name flags no parser has: {missing}"


def test_the_check_would_catch_a_made_up_flag(tmp_path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text('raise ValueError(f"pass --learning_rate or --no_such_flag")\n')
    known = set().union(*(_options(p) for p in _parsers()))
    assert _flags_in_strings(fake) - known == {"--no_such_flag"}
