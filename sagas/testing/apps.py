"""The test kit's app: injected faults (model, admin) and the hook that reads them."""

from django.apps import AppConfig


class SagasTestingConfig(AppConfig):
    name = "sagas.testing"
    label = "sagas_testing"
    verbose_name = "Sagas: injected faults (testing)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from sagas.engine import hooks

        from .faults import take

        hooks.install_fault_hook(take)
