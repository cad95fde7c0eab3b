"""The framework's tests use its test kit, as a project's would."""

pytest_plugins = ["sagas.testing.pytest_plugin"]
