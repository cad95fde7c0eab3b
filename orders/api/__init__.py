"""The REST API of orders: submit an order, and follow it with its payment, stock and shipment.

`parsers` holds a submission's limits, `serializers` its input and output, `views` the viewset;
the project's router (sagaproject.api) routes `OrderViewSet` under /api/orders/.
"""

from orders.selectors import sagas_of_order

from .parsers import LimitedJSONParser, RequestTooLarge
from .views import OrderViewSet

__all__ = ["LimitedJSONParser", "OrderViewSet", "RequestTooLarge", "sagas_of_order"]
