"""Every command-line tool follows one convention (lbsgd.cli): underscore flags, a help text and its default for
every flag, an ``examples:`` section whose command lines parse, and bad input as one line with exit status 2.
lbsgd.main's ``--print_config`` lists every field, and a mistyped field is one line with the closest one."""

import argparse
import configparser
import copy
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO
from lbsgd import cli, commcost, compare, launch, main, sweep
from lbsgd import strategies as strategies_lib
from lbsgd.bench import cli as bench_cli
from lbsgd.bench import step as bench_step
from lbsgd.bench import workers as bench_workers
from lbsgd.config import schema
from lbsgd.errors import EXIT_USAGE

DIGITS = "--config=experiments/digits.py"
TOOLS = {
    "python -m lbsgd.launch": launch.make_parser,
    "python -m lbsgd.sweep": sweep.make_parser,
    "python -m lbsgd.compare": compare.make_parser,
    "python -m lbsgd.commcost": commcost.make_parser,
    "python -m lbsgd.bench": bench_cli.make_parser,
    **{f"python -m lbsgd.bench {name}": make for name, make in bench_cli.PARSERS.items()},
}


# -- lbsgd.main, from the shell: started together, so that the four interpreters' start-ups overlap ----------------


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """name -> (CompletedProcess, workdir) of the lbsgd.main command lines the tests below check."""
    tmp = tmp_path_factory.mktemp("cli")
    commands = {
        "top": [DIGITS, f"--workdir={tmp / 'top'}", "--config.num_workerz=16"],
        "nested": [DIGITS, f"--workdir={tmp / 'nested'}", "--config.easgd.perod=4"],
        "print": [DIGITS, "--print_config", f"--workdir={tmp / 'print'}", "--config.num_workers=3",
                  "--config.easgd.period=7", "--config.warmup=none"],
    }  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "lbsgd.main", *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, args in commands.items()
    }  # fmt: skip
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), tmp / name)
    return out


@pytest.mark.parametrize(
    "name, line",
    [
        ("top", "lbsgd: error: unknown config field 'num_workerz' (did you mean 'num_workers'?)"),
        ("nested", "lbsgd: error: unknown config field 'easgd.perod' (did you mean 'easgd.period'?)"),
    ],
)
def test_a_mistyped_field_is_one_clean_line_with_the_closest_field(shell, name, line):
    proc, workdir = shell[name]
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr == line + "\n" and proc.stdout == ""
    assert "\\" not in proc.stderr and "Did you mean" not in proc.stderr
    assert not workdir.exists()


def test_print_config_lists_every_field_with_its_value_and_meaning_and_trains_nothing(shell):
    proc, workdir = shell["print"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and not workdir.exists()
    lines = proc.stdout.splitlines()
    overrides = {"num_workers": 3, "easgd.period": 7, "warmup": "none"}
    for field in schema.FIELDS:  # the schema's list, read independently of lbsgd.main
        value = overrides.get(field.name, field.default)
        pattern = rf"{re.escape(field.name)} += {re.escape(repr(value))}  # {re.escape(field.doc)}"
        assert sum(bool(re.fullmatch(pattern, line)) for line in lines) == 1, (field.name, pattern)
    for section, defaults in strategies_lib.registry.sections().items():
        for key, default in defaults.items():
            name = f"{section}.{key}"
            pattern = rf"{re.escape(name)} += {re.escape(repr(overrides.get(name, default)))}"
            assert sum(bool(re.fullmatch(pattern, line)) for line in lines) == 1, pattern
        assert any(line.startswith(f"# config.{section}, options of strategy ") for line in lines), section
    count = len(schema.FIELDS) + sum(map(len, strategies_lib.registry.sections().values()))
    assert len([line for line in lines if not line.startswith("#")]) == count


# -- lbsgd.main, in this process ------------------------------------------------------------------------------------


def test_main_help_lists_its_flags_defaults_print_config_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_flags(["lbsgd", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "console script is the same command as ``python -m lbsgd.main``" in " ".join(text.split())
    for name in main.OWN_FLAGS:
        block = text.split(f"\n  --{name}\n", 1)[1].split("\n  --", 1)[0]
        assert main.FLAGS[name].help.split()[0] in block and "(default: " in block, name
    assert "--print_config" in text and "--config.<field>=<value>" in text
    assert "\nexamples:\n" in text and all(f"  {e}\n" in text + "\n" for e in main.EXAMPLES)
    entry = configparser.ConfigParser()
    entry.read(os.path.join(REPO, "setup.cfg"))
    assert "lbsgd = lbsgd.main:run" in entry["options.entry_points"]["console_scripts"]


def test_main_examples_parse(monkeypatch):
    """Each example through absl as lbsgd.main parses it (ml_collections defines the --config.<field> flags from
    the command line it is given, so each gets flags of its own), every override landing in the config."""
    monkeypatch.chdir(REPO)
    assert len(main.EXAMPLES) >= 2
    for example in main.EXAMPLES:
        words = shlex.split(example)
        argv = ["lbsgd", *(words[3:] if words[:3] == ["python", "-m", "lbsgd.main"] else words[1:])]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
        for name in main.OWN_FLAGS[1:]:
            values[name] = copy.deepcopy(main.FLAGS[name])
        assert values(argv) == ["lbsgd"], example
        for word in argv[1:]:
            if word.startswith("--config."):
                field, value = word[len("--config.") :].split("=", 1)
                node = values.config
                for part in field.split("."):
                    node = node[part]
                assert str(node) == value, example


@pytest.mark.parametrize(
    "arg, problem",
    [
        ("--config.num_workers=2", None),
        ("--config.easgd.period=2", None),
        ("--config.num_workerz=2", "unknown config field 'num_workerz' (did you mean 'num_workers'?)"),
        ("--config.easgd.alphaa=2", "unknown config field 'easgd.alphaa' (easgd has: beta, period)"),
        ("--config.easgdd.beta=2", "unknown config field 'easgdd' (did you mean 'easgd'?)"),
        ("--config.zzzzzz=2", "unknown config field 'zzzzzz' (--print_config lists the fields)"),
        ("--config.num_workers.x=2", "config field 'num_workers' holds a value (int), not a section of fields"),
    ],
)
def test_override_problem_names_the_field_and_the_closest_one(arg, problem):
    found = cli.override_problem(schema.base_config(), ["--workdir=x", arg])
    assert found == problem if problem is None else found.startswith(problem), found


# -- every argparse tool -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prog", TOOLS)
def test_flags_are_underscored_documented_with_defaults_and_examples(prog):
    parser = TOOLS[prog]()
    assert parser.prog == prog
    formatter = parser._get_formatter()
    for action in parser._actions:
        spelled = [s for s in action.option_strings if s.startswith("--")]
        hidden = [s for s in spelled if s in parser.aliases]
        assert all("-" not in s[2:] for s in spelled if s not in hidden), spelled
        if hidden:  # a hidden alias: its own action, not shown
            assert action.help == argparse.SUPPRESS and spelled == hidden
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (prog, action.option_strings)
        if action.default is not None and action.nargs != 0:
            assert "default" in formatter._expand_help(action), (prog, action.option_strings)
    text = parser.format_help()
    assert "\nexamples:\n" in text
    assert 2 <= len(parser.examples) <= 3 and all(f"  {e}\n" in text + "\n" for e in parser.examples)
    for alias in parser.aliases:
        assert alias not in text


@pytest.mark.parametrize("prog", TOOLS)
def test_every_example_parses(prog):
    parser = TOOLS[prog]()
    for example in parser.examples:
        words = shlex.split(example)
        assert " ".join(words[: len(prog.split())]) == prog, example
        words = words[len(prog.split()) :]
        if prog == "python -m lbsgd.bench":  # the dispatcher: a subcommand, then its flags
            bench_cli.PARSERS[words[0]]().parse_args(words[1:])
        elif prog == "python -m lbsgd.launch":  # its own flags, then lbsgd.main's after --
            own, rest = words[: words.index("--")], words[words.index("--") + 1 :]
            parser.parse_args(own)
            assert cli.override_problem(schema.base_config(), rest) is None, example
            own_flags = [w.split("=")[0].lstrip("-") for w in rest if not w.startswith("--config.")]
            assert set(own_flags) <= set(main.OWN_FLAGS), example
        else:
            parser.parse_args(words)


def test_bench_help_has_one_line_per_subcommand_saying_what_it_measures(capsys):
    assert bench_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in bench_cli.SUBCOMMANDS:
        lines = [line for line in out.splitlines() if re.match(rf"  {name}\s+\S", line)]
        assert len(lines) == 1 and bench_cli.PARSERS[name]().description in lines[0], name
    assert set(bench_cli.PARSERS) == set(bench_cli.SUBCOMMANDS)
    assert "examples:" in out


def test_bench_step_offers_the_dtypes_training_accepts_and_keeps_the_dashed_flax_dir():
    parser = bench_step.make_parser()
    dtype = next(a for a in parser._actions if "--dtype" in a.option_strings)
    assert tuple(dtype.choices) == schema.DTYPES
    assert parser.parse_args(["--flax-dir=/x"]).flax_dir == "/x"
    assert parser.parse_args(["--flax_dir=/y"]).flax_dir == "/y"
    assert parser.parse_args([]).flax_dir is None
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--dtype=float16"])
    assert e.value.code == EXIT_USAGE


def test_bench_workers_refuses_an_unknown_mode_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench_workers.main(["--modes=vmap,nope"])
    assert e.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --modes nope" in err


def test_launch_usage_shows_where_the_lbsgd_main_flags_go():
    assert launch.make_parser().format_usage().rstrip().endswith("-- <lbsgd.main flags>")


@pytest.mark.parametrize("tool", [sweep, compare])
def test_override_help_says_what_it_takes(tool):
    text = " ".join(tool.make_parser().format_help().split())
    assert "--override FIELD=VALUE" in text and "without --config., e.g. --override=num_epochs=10" in text


@pytest.mark.parametrize(
    "override, line",
    [
        ("--config.num_workerz=3", "unknown config field 'num_workerz' (did you mean 'num_workers'?)"),
        ("--config.easgd.perod=2", "unknown config field 'easgd.perod' (did you mean 'easgd.period'?)"),
    ],
)
def test_sweep_and_compare_name_a_mistyped_override_in_one_clean_line(override, line):
    """sweep and compare resolve their runs' configs through lbsgd.runs: the same clean line as lbsgd.main."""
    from lbsgd import runs
    from lbsgd.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        runs.resolve_config(os.path.join(REPO, "experiments", "digits.py"), [override])
    assert str(info.value) == line
