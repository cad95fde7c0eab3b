"""A Sphinx directive that lists the REST API's endpoints from its OpenAPI schema.

`sagas-openapi` renders each operation of `sagas.urls` (mounted under a prefix, as a project
mounts it) with its summary, description and parameters, from the schema drf-spectacular makes
of the annotated views: the reference page follows the code without a copy of the schema.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def operations(prefix: str) -> list[tuple[str, str, dict[str, Any]]]:
    from django.urls import include, path
    from drf_spectacular.generators import SchemaGenerator

    generator = SchemaGenerator(patterns=[path(prefix.lstrip("/"), include("sagas.urls"))])
    schema = generator.get_schema(request=None, public=True)
    return [
        (method.upper(), url, operation)
        for url, methods in schema["paths"].items()
        for method, operation in methods.items()
    ]


def as_markdown(method: str, url: str, operation: dict[str, Any]) -> list[str]:
    """An operation as MyST Markdown (the directive's content is parsed as the page is)."""
    summary = operation.get("summary", "").rstrip(".")
    description = " ".join(operation.get("description", "").split())
    lines = [f"**`{method} {url}`**: {summary}. {description}".rstrip(), ""]
    for parameter in operation.get("parameters", []):
        # drf-spectacular appends an enum's values as a Markdown list: named from the schema.
        text = " ".join(parameter.get("description", "").split("\n\n*", 1)[0].split())
        values = parameter.get("schema", {}).get("enum")
        if values:
            text += " One of " + ", ".join(f"`{value}`" for value in values) + "."
        lines.append(f"- `{parameter['name']}` ({parameter['in']}){': ' + text if text else ''}")
    return [*lines, ""]


class OpenAPIEndpoints(SphinxDirective):
    optional_arguments = 1  # the prefix the project mounts `sagas.urls` under

    def run(self) -> list[nodes.Node]:
        prefix = self.arguments[0] if self.arguments else "/api/sagas/"
        text = [line for op in operations(prefix) for line in as_markdown(*op)]
        container = nodes.container()
        content = StringList(text, source="sagas.urls")
        self.state.nested_parse(content, self.content_offset, container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("sagas-openapi", OpenAPIEndpoints)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
