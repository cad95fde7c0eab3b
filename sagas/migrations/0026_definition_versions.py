# Stage definitions stored once per definition version (`DefinitionVersion`), not copied into
# every stage row: a new saga's rows hold none (`SagaStep.stored_definition`, the column
# `definition`, becomes nullable), and each update of a stage no longer writes its definition
# again to the WAL. The version of each digest the sagas already started name is copied from
# one of its sagas whose rows hash to that digest (a saga whose rows were changed without a
# digest of their own is passed over); their rows keep their copies: nothing is rewritten, and
# a saga without a stored version reads its rows, as before.
#
# Not atomic: the column's change takes the table's lock for a moment, and the copy, a read of
# every saga, runs after it, holding no lock that stops the engine.

import hashlib
import json

from django.db import migrations, models


def digest_of(steps):
    """The digest the sagas name their version by, as `sagas.definitions.snapshot_version`
    made it when this migration was written (a migration keeps its own copy)."""
    encoded = json.dumps(steps, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


# Per digest, the earliest sagas that name it: candidates, in order, for its content.
CANDIDATES = """
SELECT definition_version, name, id, created_at FROM (
    SELECT definition_version, name, id, created_at,
           row_number() OVER (PARTITION BY definition_version ORDER BY created_at, id) AS n
    FROM sagas_saga WHERE definition_version <> ''
) ranked
WHERE n <= 5
ORDER BY definition_version, n
"""


def copy_versions(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute(CANDIDATES)
        candidates = cursor.fetchall()
        stored = set()
        for digest, name, saga_id, created_at in candidates:
            if digest in stored:
                continue
            cursor.execute(
                'SELECT definition FROM sagas_sagastep WHERE saga_id = %s ORDER BY "index"',
                [saga_id],
            )
            rows = [value for (value,) in cursor.fetchall()]
            if not rows or any(value is None for value in rows):
                continue
            steps = [json.loads(v) if isinstance(v, str) else v for v in rows]
            if digest_of(steps) != digest:
                continue  # changed by hand under its old digest
            cursor.execute(
                "INSERT INTO sagas_definitionversion (digest, name, steps, created_at) "
                "VALUES (%s, %s, %s::jsonb, %s) ON CONFLICT (digest) DO NOTHING",
                [digest, name, json.dumps(steps), created_at],
            )
            stored.add(digest)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0025_cheap_rows"),
    ]

    operations = [
        migrations.CreateModel(
            name="DefinitionVersion",
            fields=[
                (
                    "digest",
                    models.CharField(
                        help_text="Their digest.",
                        max_length=64,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                (
                    "name",
                    models.CharField(help_text="The saga definition's name.", max_length=100),
                ),
                ("steps", models.JSONField(help_text="The stage definitions, in order.")),
                (
                    "created_at",
                    models.DateTimeField(help_text="When a saga first started from it."),
                ),
            ],
            options={"verbose_name": "definition version"},
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RenameField(
                    model_name="sagastep", old_name="definition", new_name="stored_definition"
                ),
                migrations.AlterField(
                    model_name="sagastep",
                    name="stored_definition",
                    field=models.JSONField(
                        blank=True,
                        db_column="definition",
                        help_text="The stage's definition copied into its row (sagas started "
                        "before definitions were stored once per version); else empty, and "
                        "read from its saga's definition version.",
                        null=True,
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    "ALTER TABLE sagas_sagastep ALTER COLUMN definition DROP NOT NULL",
                    # Back: every row gets its copy again (from its saga's version) first.
                    "UPDATE sagas_sagastep st SET definition = v.steps -> st.index "
                    "FROM sagas_saga s JOIN sagas_definitionversion v "
                    "ON v.digest = s.definition_version "
                    "WHERE s.id = st.saga_id AND st.definition IS NULL; "
                    "ALTER TABLE sagas_sagastep ALTER COLUMN definition SET NOT NULL",
                ),
            ],
        ),
        migrations.RunPython(copy_versions, migrations.RunPython.noop),
    ]
