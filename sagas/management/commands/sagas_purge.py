"""`manage.py sagas_purge --older-than 30d`: delete finished sagas, with their steps and events.

A progress line for a person (on a terminal, on stderr), one summary line for logs (stdout).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...durations import parse_duration
from ...retention import BATCH_SIZE, PURGEABLE, PurgeReport, count, parse_statuses, purge


class Command(BaseCommand):
    help = (
        "Delete completed and compensated sagas that finished more than --older-than ago, "
        "with their steps and events, in batches of one transaction each. Never a saga in "
        "flight or failed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            required=True,
            metavar="AGE",
            help="How long ago a saga must have finished: 30d, 12h, 90m (also s and w).",
        )
        parser.add_argument(
            "--status",
            default=",".join(PURGEABLE),
            help=f"Which finished sagas, comma-separated (default: {','.join(PURGEABLE)}).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=BATCH_SIZE,
            help=f"Sagas deleted per transaction (default: {BATCH_SIZE}).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            older_than = parse_duration(options["older_than"])
            statuses = parse_statuses(options["status"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if not 1 <= options["batch_size"] <= 10_000:
            raise CommandError("--batch-size must be from 1 to 10000")
        progress = self._progress if self.stderr.isatty() and not options["dry_run"] else None
        self._total = 0
        report = purge(
            older_than=older_than,
            statuses=statuses,
            batch_size=options["batch_size"],
            dry_run=options["dry_run"],
            progress=progress,
        )
        if progress is not None and report.batches:
            self.stderr.write("", style_func=str)  # ends the progress line
        self.stdout.write(report.summary())

    def _progress(self, report: PurgeReport) -> None:
        """`\\r`-rewritten line on a terminal: how many of how many, and a bar."""
        if not self._total:  # counted once, at the first batch
            self._total = report.total + sum(count(report.cutoff, report.statuses).values())
        done, width = report.total, 30
        filled = width * done // max(self._total, 1)
        self.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,} of {self._total:,} sagas, "
            f"{report.batches:,} batch(es)",
            style_func=str,
            ending="",
        )
        self.stderr.flush()
