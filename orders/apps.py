"""App configuration for orders."""

from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "orders"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the order fulfilment saga in every process (web, worker, beat), so a worker
        # can run the sagas a web process starts; and the receivers of its signals, which log
        # a line when an order saga is undone or needs an operator.
        from orders import receivers, sagas  # noqa: F401
