"""One vocabulary across the four commands: shared flags spelled as ``phi3v_core.cli.vocabulary`` says, aliases
kept, ``--version`` everywhere, every bad flag value reported at once before torch is imported."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator

import pytest

from bench.cli import build_parser as bench_parser
from phi3v_core.cli.convert import build_parser as convert_parser
from phi3v_core.cli.finetune import build_parser as finetune_parser
from phi3v_core.cli.vocabulary import DEFAULT_SEED, SHARED_FLAGS, plural, shared_flags_markdown
from phi3v_core.errors import ConfigError
from planner.cli import build_parser as plan_parser
from tests.safety_helpers import HANG_GUARD_S

PARSERS = {
    "phi3v-finetune": finetune_parser,
    "phi3v-bench": bench_parser,
    "phi3v-plan": plan_parser,
    "phi3v-convert": convert_parser,
}
MAINS = {
    "phi3v-finetune": "phi3v_core.cli.finetune",
    "phi3v-bench": "bench.cli",
    "phi3v-plan": "planner.cli",
    "phi3v-convert": "phi3v_core.cli.convert",
}


def _actions(parser: argparse.ArgumentParser, where: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every option of a parser and its subcommands, with ``command subcommand`` as where."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        elif action.option_strings:
            yield where, action


def _all_options() -> list[tuple[str, argparse.Action]]:
    return [item for command, build in PARSERS.items() for item in _actions(build(), command)]


def _normal(option: str) -> str:
    return option.lstrip("-").replace("-", "_").removeprefix("no_")


def test_shared_flags_are_spelled_as_the_table_says():
    problems = []
    for where, action in _all_options():
        for flag in SHARED_FLAGS.values():
            if set(action.option_strings) & set(flag.spellings):
                if action.option_strings[0] != flag.primary:
                    problems.append(f"{where}: {action.option_strings} should start with {flag.primary}")
                negations = {o for o in action.option_strings if o.startswith(("--no-", "--no_"))}
                extra = set(action.option_strings) - set(flag.spellings) - negations
                if extra:
                    problems.append(f"{where}: {sorted(extra)} are not spellings of {flag.primary} in SHARED_FLAGS")
    assert not problems, "\n".join(problems)


def test_no_two_commands_spell_one_concept_differently():
    # The same name up to dashes/underscores must have the same primary spelling everywhere (--num-crops in one
    # command and --num_crops in another is the mistake this catches).
    primaries: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for where, action in _all_options():
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith(("--no-", "--no_")) and option != "--help":
                primaries[_normal(option)].add((action.option_strings[0].replace("--no-", "--"), where))
    differing = {
        name: sorted(seen) for name, seen in primaries.items() if len({primary for primary, _ in seen}) > 1
    }
    assert not differing, differing


def test_every_listed_command_takes_the_shared_flag():
    taken: dict[str, set[str]] = defaultdict(set)
    for where, action in _all_options():
        taken[where.split()[0]].update(action.option_strings)
    for flag in SHARED_FLAGS.values():
        for command in flag.commands:
            assert flag.primary in taken[command], f"{command} lacks {flag.primary}"


@pytest.mark.parametrize(
    ("command", "old", "new"),
    [
        ("phi3v-finetune", ["--num-crops", "4"], ["--num_crops", "4"]),
        ("phi3v-finetune", ["--batch_size_per_gpu", "2"], ["--per_device_train_batch_size", "2"]),
        ("phi3v-finetune", ["--resume"], ["--resume_from_checkpoint"]),
        ("phi3v-bench", ["run", "--steps", "5"], ["run", "--max_steps", "5"]),
        ("phi3v-bench", ["run", "--global-batch", "4"], ["run", "--batch_size", "4"]),
        ("phi3v-bench", ["run", "--model", "tiny"], ["run", "--model_name_or_path", "tiny"]),
        ("phi3v-bench", ["run", "--overwrite"], ["run", "--overwrite_output_dir"]),
        ("phi3v-bench", ["run", "--micro-batch", "2"], ["run", "--per_device_train_batch_size", "2"]),
        ("phi3v-plan", ["--count", "2"], ["--gpus", "2"]),
        ("phi3v-plan", ["--model-path", "tiny"], ["--model_name_or_path", "tiny"]),
        ("phi3v-plan", ["--data", "x"], ["--data_dir", "x"]),
        ("phi3v-convert", ["synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", "o", "--overwrite"],
         ["synthetic", "--task", "nlvr2", "--n", "2", "--output_dir", "o", "--overwrite_output_dir"]),
    ],
)
def test_old_spellings_are_aliases(command, old, new):
    build = PARSERS[command]
    assert build().parse_args(old) == build().parse_args(new)


def test_one_seed_default():
    assert finetune_parser().parse_args([]).seed is None  # resolved to the recipe default below
    from phi3v_core.cli.finetune_config import OUR_DEFAULTS

    assert OUR_DEFAULTS["seed"] == DEFAULT_SEED
    assert bench_parser().parse_args(["run"]).seed == DEFAULT_SEED
    syn = convert_parser().parse_args(["synthetic", "--task", "nlvr2", "--n", "2", "--out_dir", "o"])
    assert syn.seed == DEFAULT_SEED


@pytest.mark.parametrize("command", list(MAINS))
def test_version_on_every_command(command):
    out = subprocess.run(
        [sys.executable, "-m", MAINS[command], "--version"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{command} ") and out.stdout.split()[1][0].isdigit()


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        finetune_parser().parse_args(["--learning_rate", "5", "--lora_rank", "0"])
    message = str(info.value)
    assert "2 problems" in message and "--learning_rate" in message and "--lora_rank" in message
    with pytest.raises(ConfigError) as info:
        bench_parser().parse_args(["run", "--optim", "sgd", "--learning_rate", "7"])
    assert "--optim" in str(info.value) and "--learning_rate" in str(info.value)


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        ("phi3v_core.cli.finetune", ["--learning_rate", "5", "--lora_rank", "0"], "--lora_rank"),
        ("phi3v_core.cli.finetune", ["--report_to", "comet"], "--report_to"),
        ("phi3v_core.cli.finetune", ["--task", "jsonl", "--data_dir", "/nonexistent"], "--data_dir /nonexistent"),
        ("bench.cli", ["run", "--steps", "0"], "steps"),
        ("bench.cli", ["run", "--method", "LoRA"], "LoRA"),
        ("planner.cli", ["--gpu", "A100-80GB", "--data", "/nonexistent"], "/nonexistent"),
        # a data folder's own problems (here: no *_train.jsonl) are found without torch (phi3v_core.data loads its
        # torch datasets on first use)
        ("phi3v_core.cli.convert", ["check", "/"], "/"),
    ],
)
def test_bad_values_answer_before_torch_is_imported(module, argv, expected):
    # The heavy libraries are imported only after validation (no wall-clock assert: which modules were imported).
    code = (
        "import sys\n"
        f"from {module} import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert "HEAVY [] 1" in out.stdout, out.stdout + out.stderr
    assert expected in out.stderr and "Traceback" not in out.stderr


def test_plurals():
    assert (plural(1, "crop"), plural(4, "crop"), plural(1, "node"), plural(2, "node")) == (
        "1 crop", "4 crops", "1 node", "2 nodes",
    )


def test_readme_shows_the_shared_flags_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert shared_flags_markdown() in readme
