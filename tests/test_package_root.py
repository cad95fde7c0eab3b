"""The package root is the public API: `from sagas import SagaDefinition, saga_start, ...`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import sagas

ROOT = Path(__file__).resolve().parent.parent
# The modules a public name may live in: the ones users imported before the root exported them.
HOMES = {
    "sagas.definitions",
    "sagas.services",
    "sagas.exceptions",
    "sagas.bulk.filters",
    "sagas.bulk.skip",
}
TUTORIAL = {
    "SagaDefinition",
    "Step",
    "RetryPolicy",
    "StepContext",
    "register",
    "saga_start",
    "saga_retry",
    "saga_compensate",
    "saga_step_resolve",
    "saga_plan",
    "bulk_action_preview",
    "bulk_action_start",
    "BusinessError",
    "TransientError",
    "StepError",
    "SagaBusy",
    "SagaKeyInFlight",
}


def test_all_has_the_tutorials_names_once_and_sorted():
    assert TUTORIAL.issubset(sagas.__all__)
    assert len(set(sagas.__all__)) == len(sagas.__all__)
    assert sagas.__all__ == sorted(sagas.__all__)


@pytest.mark.parametrize("name", sagas.__all__)
def test_a_public_name_is_its_home_modules_object(name):
    obj = getattr(sagas, name)
    assert obj.__module__ in HOMES, f"{name} comes from {obj.__module__}"
    assert getattr(import_module(obj.__module__), name) is obj


def test_the_public_names_import_from_the_root():
    from sagas import SagaDefinition, saga_start
    from sagas.definitions import SagaDefinition as Defined
    from sagas.services import saga_start as start

    assert (SagaDefinition, saga_start) == (Defined, start)


def test_dir_lists_the_public_names_and_the_version():
    listed = dir(sagas)
    assert set(sagas.__all__) <= set(listed)
    assert "__version__" in listed
    assert listed == sorted(listed)


def test_an_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        sagas.no_such_name  # noqa: B018
    assert not hasattr(sagas, "no_such_name")
    with pytest.raises(ImportError):
        from sagas import no_such_name  # noqa: F401


def test_importing_the_package_alone_imports_neither_django_nor_the_models():
    # As `sagas.apps` or a settings module does, before Django's app registry is ready.
    code = (
        "import json, sys\n"
        "import sagas\n"
        "print(json.dumps({'all': sorted(sagas.__all__), 'modules': sorted(sys.modules)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    assert found["all"] == sorted(sagas.__all__)
    assert "sagas.models" not in found["modules"]
    assert "django" not in found["modules"]
    # Only the helper of the lazy names, which imports nothing but the standard library.
    assert [m for m in found["modules"] if m.startswith("sagas.")] == ["sagas.lazy"]
