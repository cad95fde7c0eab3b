"""The ceiling of `make bench-api`: the least an authenticated submission can cost on this server.

`POST /bench/submissions/` authenticates like the API (a token), validates a small body with a
DRF serializer, inserts one row (in the benchmark's `bench_counter` table, as `bench.run`'s bare
chain) and, once it is committed, publishes one Celery message (`bench.bare_step`, which updates
that row). The project mounts it only with `SAGAPROJECT_BENCH_ENDPOINTS=1` (`bench.api_load` sets
it for its own server): a deployment never serves it.
"""

from __future__ import annotations

from django.db import connection
from django.urls import path
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from bench.tasks import TABLE, bare_step


class SubmissionSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    quantity = serializers.IntegerField(min_value=1, max_value=100)


class SubmissionView(APIView):
    """Validate, insert one row, publish one message: 202 with the row's id."""

    permission_classes = [IsAuthenticated]

    def post(self, request: Request) -> Response:
        submission = SubmissionSerializer(data=request.data)
        submission.is_valid(raise_exception=True)
        # One statement in autocommit: the row is committed when the message is sent.
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {TABLE} (n) VALUES (0) RETURNING id")
            (row_id,) = cursor.fetchone()
        bare_step.delay(row_id)
        return Response({"id": row_id}, status=status.HTTP_202_ACCEPTED)


urlpatterns = [path("submissions/", SubmissionView.as_view(), name="bench-submission")]
