"""Every setting is declared once (``options.declared``), and what is made from the declaration
agrees with it: the README's table, the variables the code reads, the workers' settings and
the fast path's flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from coordinator.cli import fastpath
from coordinator.cli.main import build_parser
from options.declared import OPTIONS, WAL_FETCH, WAL_PUSH, WORKER, env_names, options_of
from options.readme import BEGIN, END, table
from tasks.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
# A variable name in the code: a string literal, or in a docstring or comment.
_VARIABLE = re.compile(r"\bCLOUD_DUMP_[A-Z0-9_]*[A-Z0-9]\b")


def test_the_readme_table_is_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme
    shown = readme[readme.index(BEGIN) + len(BEGIN):readme.index(END)].strip()
    assert shown == table(), "README's table differs: run `python -m options.readme`"


def test_every_variable_the_code_names_is_declared() -> None:
    named: dict[str, str] = {}
    for package in ("coordinator", "storage", "workers", "tasks", "options"):
        for path in (ROOT / package).rglob("*.py"):
            for name in _VARIABLE.findall(path.read_text()):
                named.setdefault(name, str(path.relative_to(ROOT)))
    undeclared = {name: where for name, where in named.items() if name not in env_names()}
    assert undeclared == {}


def test_the_workers_read_exactly_the_rows_declared_for_them() -> None:
    declared = {o.env.removeprefix("CLOUD_DUMP_").lower() for o in OPTIONS
                if WORKER in o.commands and o.env}  # fmt: skip
    assert set(WorkerSettings.model_fields) == declared
    for option in OPTIONS:
        if WORKER in option.commands and option.env:
            field = WorkerSettings.model_fields[option.env.removeprefix("CLOUD_DUMP_").lower()]
            expected = option.default if option.worker_default is None else option.worker_default
            assert field.default == expected, option


def test_the_fast_path_knows_every_flag_of_the_wal_commands() -> None:
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert isinstance(choices, dict)
    commands: dict[str, argparse.ArgumentParser] = choices
    for command, value_flags, switches in (
        (WAL_PUSH, fastpath.WAL_PUSH_VALUE_FLAGS, fastpath.WAL_PUSH_SWITCHES),
        (WAL_FETCH, fastpath.WAL_FETCH_VALUE_FLAGS, fastpath.WAL_FETCH_SWITCHES),
    ):
        flags = {s for a in commands[command]._actions for s in a.option_strings}
        assert flags - {"-h", "--help"} == value_flags | switches
        assert {o.flag for o in options_of(command) if o.flag} <= flags


def test_the_readme_exit_codes_are_the_codes_the_cli_exits_with() -> None:
    """The README's table, --help and the error classes name the same statuses."""
    from coordinator.cli.exitcodes import SUMMARY, ExitCode, exit_code_for, help_epilog
    from storage import errors

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Exit codes"):]
    section = section[:section.index("\n\n", section.index("| code |"))]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}
    assert set(SUMMARY) == set(ExitCode)
    assert all(f"{int(code)} {SUMMARY[code]}" in help_epilog() for code in ExitCode)
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.CloudDumpError):
            assert cls.exit_code in set(ExitCode), cls
            assert exit_code_for(cls.__new__(cls)) == cls.exit_code


def test_each_commands_typed_settings_are_its_declared_options() -> None:
    """The typed settings a command runs with (coordinator.settings) have a field for each of
    its declared options, and nothing the table does not declare."""
    from dataclasses import fields

    from coordinator.cli.main import _POSITIONALS
    from coordinator.cli.settings import SETTINGS

    for command, cls in SETTINGS.items():
        positional = {dest for dest, _, _ in _POSITIONALS.get(command, [])}
        extra = {"command", "passphrase_from_flag", "wal_passphrase_from_flag",
                 "db_url_from_environment"} | positional
        declared = {o.dest for o in options_of(command) if o.dest}
        env_only = {o.env.removeprefix("CLOUD_DUMP_").lower() for o in options_of(command)
                    if o.flag is None and o.env}  # fmt: skip
        names = {f.name for f in fields(cls)}
        assert declared <= names, (command, declared - names)
        assert names <= declared | env_only | extra, (command, names - declared - env_only)
