"""App configuration for the saga framework."""

from django.apps import AppConfig


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Modules that register saga definitions, imported in every process (web, worker, beat)
        # so a worker can run any saga that a web process starts.
        from importlib import import_module

        from celery.signals import worker_init

        from . import checks, conf

        # A worker started with a pool that cannot enforce hard time limits says so at start.
        worker_init.connect(checks.check_worker_pool, weak=False)

        for module in conf.modules():
            import_module(module)
        # Optional, each with its extra: Prometheus metrics and OpenTelemetry traces.
        if conf.metrics():
            from . import metrics

            metrics.install()
        if conf.tracing():
            from . import tracing

            tracing.install()
