"""`manage.py sagas_one_in_flight NAME`: bring the sagas in flight under one saga per key.

For a definition whose `one_in_flight_per_key` a deploy turned on (`sagas.W009`).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError

from ...definitions import get_definition
from ...exceptions import DefinitionError
from ...keys import bring_under_the_index


class Command(BaseCommand):
    help = (
        "Bring the unfinished sagas of a definition with one_in_flight_per_key under its "
        "unique index (those that started before it was turned on); list the keys that "
        "already have more than one saga in flight, which an operator settles first."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The saga definition's name.")
        parser.add_argument("--dry-run", action="store_true", help="Report; change nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        try:
            definition = get_definition(name)
        except DefinitionError as exc:
            raise CommandError(str(exc)) from None
        if not definition.one_in_flight_per_key:
            raise CommandError(f"The definition {name!r} does not set one_in_flight_per_key.")
        try:
            report = bring_under_the_index(name, dry_run=options["dry_run"])
        except IntegrityError:
            raise CommandError(
                "A saga started meanwhile for one of these keys: run the command again."
            ) from None
        verb = "would be brought" if options["dry_run"] else "brought"
        self.stdout.write(f"{report.brought} unfinished sagas of {name} {verb} under the index.")
        for key, ids in report.crowded.items():
            self.stdout.write(f"key {key!r}: {len(ids)} sagas in flight: {', '.join(ids)}")
        if report.crowded:
            raise CommandError(
                f"{len(report.crowded)} keys have more than one saga in flight: finish or "
                "compensate all but one of each (the admin, by key), then run this again."
            )
