"""The order team's ears on its sagas (`sagas.signals`): a log line when one stops or is undone.

Connected in `OrdersConfig.ready`, so every process hears the sagas it moves: the worker hears
steps and compensations, the web process the starts and the operators' actions.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import receiver

from sagas.signals import saga_compensated, saga_failed, saga_paused

from .services import ORDER_FULFILMENT_SAGA

logger = logging.getLogger("orders")


@receiver(saga_compensated)
def order_saga_compensated(
    *, definition: str, saga_id: Any, error_code: str, **kwargs: Any
) -> None:
    if definition == ORDER_FULFILMENT_SAGA:
        logger.info("order saga %s compensated (%s)", saga_id, error_code or "aborted")


@receiver(saga_paused)
@receiver(saga_failed)
def order_saga_needs_an_operator(
    *, definition: str, saga_id: Any, step: str | None, error_code: str, **kwargs: Any
) -> None:
    if definition == ORDER_FULFILMENT_SAGA:
        logger.warning(
            "order saga %s needs an operator: step %s, %s", saga_id, step or "-", error_code
        )
