"""What ``restore`` tells the operator at its end: sentences, not objects.

What was restored where (tablespaces too), how many bytes were fetched and written, how many
files were verified against ``backup_manifest`` and how long it took; which recovery settings
were disabled or written; what the copy will do when started (crash recovery and open as a
primary on the source's timeline, replay archived WAL on the timeline restore chose
(``coordinator.restore.timelines``) to a target and promote, or start as a standby); and whether it
will archive, and into which archive (``archive_mode`` and ``archive_command``,
``coordinator.restore.archiving``). Warnings (a copy that would archive into the archive it came
from, on the source's timeline or on a new one, recovery settings cloud-dump did not write that
change what was asked) are returned separately, for stderr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from coordinator.catalog import human_size
from coordinator.restore.archiving import archiving_line
from coordinator.restore.pgconf import ConfigView
from coordinator.restore.recoveryconf import SettingsOutcome, SettingsRequest
from coordinator.restore.run import RestoreSummary, TargetPlan
from coordinator.restore.targets import utc_text
from storage.manifest import BackupManifest
from storage.redact import redact_url

_KEYWORD_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)")
_URI_PASSWORD_RE = re.compile(r"([?&]password=)[^&]*")


@dataclass(frozen=True)
class Report:
    lines: list[str]
    warnings: list[str]


def restore_report(
    summary: RestoreSummary,
    manifest: BackupManifest,
    request: SettingsRequest,
    outcome: SettingsOutcome,
    plan: TargetPlan | None,
    source_archive: str,
) -> Report:
    """``source_archive``: the WAL archive this restore names (``<storage>/<wal root>``)."""
    lines = _restored_lines(summary, manifest, plan)
    lines += _settings_lines(request, outcome)
    warnings = _foreign_warnings(request, outcome)
    lines.append(_on_start(manifest, request, outcome, source_archive))
    archiving, warning = archiving_line(manifest, request, outcome, source_archive)
    lines.append(archiving)
    if warning:
        warnings.append(warning)
    return Report(lines, warnings)


def _restored_lines(
    summary: RestoreSummary, manifest: BackupManifest, plan: TargetPlan | None
) -> list[str]:
    lines = [
        f"restored backup '{manifest.name}' (PostgreSQL {manifest.pg_version}, timeline "
        f"{manifest.timeline}, ended {utc_text(manifest.end_time)}) into {summary.pgdata}"
    ]
    for oid, location in sorted((plan.tablespaces if plan else {}).items()):
        lines.append(f"  tablespace {oid} into {location}")
    lines.append(
        f"fetched {human_size(summary.bytes_fetched)}, wrote {human_size(summary.bytes_written)}; "
        f"{summary.files_verified:,} files verified against backup_manifest; "
        f"{summary.seconds:.1f} s"
    )
    return lines


def _settings_lines(request: SettingsRequest, outcome: SettingsOutcome) -> list[str]:
    lines = []
    if outcome.disabled:
        shown_disabled = [d.name if d.name == "restore_command" else f"{d.name} = '{d.value}'"
                          for d in outcome.disabled if d.value]
        unset = len(outcome.disabled) - len(shown_disabled)
        if unset:
            shown_disabled.append(f"{unset} empty setting(s)")
        lines.append("commented out in postgresql.auto.conf, left by an earlier restore or "
                     f"recovery: {', '.join(shown_disabled)}")
    shown = {k: v for k, v in outcome.written.items() if v and k != "restore_command"}
    if outcome.written:
        what = (["restore_command"] if "restore_command" in outcome.written else []) + [
            f"{k} = '{v}'" for k, v in shown.items()
        ]
        lines.append(f"wrote to postgresql.auto.conf: {', '.join(what)}")
    lines += outcome.signal_notes
    command = request.command
    if command is not None:
        secrets = [k for k in command.settings if k.startswith("AWS_") or k in (
            "CLOUD_DUMP_PASSPHRASE", "CLOUD_DUMP_PASSPHRASE_FILE", "CLOUD_DUMP_IDENTITY_KEY")]
        held = f"; holds {', '.join(secrets)} from this restore" if secrets else ""
        lines.append(f"restore_command reads its settings from {command.config_path} (mode "
                     f"0600{held}): the server's OS user must own it, and any key or "
                     "passphrase file it names")
    return lines


def _on_start(
    manifest: BackupManifest, request: SettingsRequest, outcome: SettingsOutcome, archive: str
) -> str:
    if request.target is not None:
        text = (f"on start: the copy replays WAL archived in {archive} (restore_command runs "
                f"cloud-dump wal-fetch) up to {request.target.describe()}, then promotes to a "
                "new timeline and opens as a primary")
        if request.target.sought_in_wal:
            # Restore cannot see it coming (the WAL may still be on its way), so the line says
            # what the operator will see.
            text += ("; if the archived WAL ends before that target, PostgreSQL stops instead "
                     "(FATAL: recovery ended before configured recovery target was reached) "
                     "and promotes nothing: archive the missing WAL and start it again")
        return text
    if outcome.standby:
        return "on start: " + _standby(outcome.config)
    return (f"on start: the copy recovers to the backup's end with the WAL inside the backup "
            f"({manifest.start_wal_file} .. {manifest.end_wal_file}), then opens as a primary "
            f"on timeline {manifest.timeline}, the source's timeline")


def _standby(config: ConfigView) -> str:
    text = ("the copy starts as a standby (the backup was taken from a standby and carries "
            "standby.signal)")
    conninfo = config.get("primary_conninfo")
    restore = config.get("restore_command")
    sources = []
    if conninfo is not None and conninfo.value:
        sources.append(f"streams from primary_conninfo '{hide_password(conninfo.value)}' "
                       f"({conninfo.path.name})")
    if restore is not None and restore.value:
        sources.append(f"restores archived WAL with restore_command '{restore.value}' "
                       f"({restore.path.name})")
    if sources:
        return f"{text}: it {' and '.join(sources)}{_unseen(config)}"
    return (f"{text}, and neither primary_conninfo nor restore_command is set in PGDATA's "
            f"configuration{_unseen(config)}: it will wait for WAL forever; set "
            "primary_conninfo, or remove standby.signal to open it as a primary")


def hide_password(conninfo: str) -> str:
    """A libpq connection string (keyword=value or URI) with its password replaced by ``***``."""
    if "://" in conninfo:
        return _URI_PASSWORD_RE.sub(r"\1***", redact_url(conninfo))
    return _KEYWORD_PASSWORD_RE.sub(r"\1***", conninfo)


def _unseen(config: ConfigView) -> str:
    return " (settings outside PGDATA were not seen)" if config.unseen else ""


def _foreign_warnings(request: SettingsRequest, outcome: SettingsOutcome) -> list[str]:
    """Recovery settings cloud-dump did not write that change what this restore asked for."""
    foreign = dict(outcome.foreign)
    if not outcome.standby and request.target is None:
        # Crash recovery reads no recovery setting; only a target would act later, on a
        # recovery nobody asked for.
        foreign = {k: v for k, v in foreign.items() if k.startswith("recovery_target")}
        when = "if the copy is ever started with recovery.signal or standby.signal"
    elif request.target is not None:
        foreign = {k: v for k, v in foreign.items() if k in (
            "recovery_end_command", "recovery_min_apply_delay")}
        when = "during this restore's recovery"
    else:
        # Where the standby gets its WAL from is said in the "on start" line.
        foreign = {k: v for k, v in foreign.items()
                   if k not in ("primary_conninfo", "restore_command")}
        when = "while the copy runs as a standby"
    return [
        f"{name} = '{hide_password(value) if name == 'primary_conninfo' else value}' is set in "
        f"{_where(outcome.config, name)}, not by cloud-dump restore: it applies {when}"
        for name, value in sorted(foreign.items())
    ]


def _where(config: ConfigView, name: str) -> str:
    setting = config.get(name)
    return str(setting.path) if setting is not None else "the configuration"
