# Stage definitions stored once per definition version (`DefinitionVersion`), not copied into
# every stage row: a new saga's rows hold none (`SagaStep.stored_definition`, the column
# `definition`, becomes nullable), and each update of a stage no longer writes its definition
# again to the WAL. The versions of the sagas already started are copied from one saga each
# (their rows keep their copy: nothing is rewritten); a saga without a version (made by hand)
# reads its rows, as before.

from django.db import migrations, models

COPY_VERSIONS = """
INSERT INTO sagas_definitionversion (digest, name, steps, created_at)
SELECT DISTINCT ON (s.definition_version)
       s.definition_version, s.name,
       (SELECT jsonb_agg(st.definition ORDER BY st.index)
        FROM sagas_sagastep st WHERE st.saga_id = s.id),
       s.created_at
FROM sagas_saga s
WHERE s.definition_version <> ''
  AND NOT EXISTS (SELECT FROM sagas_sagastep st WHERE st.saga_id = s.id AND st.definition IS NULL)
  AND EXISTS (SELECT FROM sagas_sagastep st WHERE st.saga_id = s.id)
ORDER BY s.definition_version, s.created_at
ON CONFLICT (digest) DO NOTHING
"""


class Migration(migrations.Migration):
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
        migrations.RunSQL(COPY_VERSIONS, migrations.RunSQL.noop),
    ]
