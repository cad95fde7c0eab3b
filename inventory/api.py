"""The REST API of the catalog: products with their price and the stock available to order."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers, viewsets

from inventory.models import Product
from sagas.api import ModelSerializer, Pagination


class ProductSerializer(ModelSerializer):
    available_stock = serializers.IntegerField(
        source="stock_on_hand",
        read_only=True,
        help_text="Units that can be ordered now (stock already reserved is deducted).",
    )

    class Meta:
        model = Product
        fields = ["sku", "name", "price", "available_stock"]
        read_only_fields = fields


@extend_schema_view(
    list=extend_schema(summary="The catalog"),
    retrieve=extend_schema(summary="A product, by SKU"),
)
class ProductViewSet(viewsets.ReadOnlyModelViewSet):
    """The catalog, ordered by SKU."""

    serializer_class = ProductSerializer
    pagination_class = Pagination
    lookup_field = "sku"
    lookup_value_regex = "[^/]{1,64}"

    def get_queryset(self) -> QuerySet[Product]:
        return Product.objects.order_by("sku")
