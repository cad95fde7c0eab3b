"""The Celery app's broker connection: kombu's, with a crash on reconnection worked around.

When a worker's main process loses Redis, Celery 5.7 collects the broken connection and then
closes it (`Consumer.on_connection_error_after_connected` in celery/worker/consumer/consumer.py;
Celery 5.6 only collected it). `Connection.collect()` detaches the transport
(`transport.client = None`) but keeps the default channel (kombu/connection.py, `_do_close_self`
never clears it). If that channel's close failed half-way, because Redis refused the connection
while the channel read the reply of its pending BRPOP, the channel is still open, and the close
that follows closes it again: it now tries to give its unacknowledged messages back to Redis
through the detached transport, `_connparams()` reads `None.hostname`, and the AttributeError,
not being a connection error, escapes Celery's reconnection loop: "Unrecoverable error:
AttributeError("'NoneType' object has no attribute 'hostname'")", and the main process exits.
It happens when a step is in flight (acks late) while the worker waits in BRPOP, and the worker
hears of the outage first on another connection (its remote-control channel's).

The close after the collect is new in Celery 5.7, next to the fix for workers that hung on
reconnection (https://github.com/celery/celery/issues/9705). The same AttributeError, from a
channel closed after its connection was released: https://github.com/celery/kombu/issues/582

A collected connection has nothing left to close, so it forgets its default channel, and the
close after it does nothing, as in Celery 5.6. The unacknowledged messages could not be given
back anyway (Redis was down): Redis redelivers them after the visibility timeout, or, when it
restarted empty, the saga sweeper sends the steps again from the rows.
"""

from __future__ import annotations

from celery.app.amqp import AMQP
from kombu import Connection


class BrokerConnection(Connection):
    """A kombu connection that forgets its default channel once collected."""

    def collect(self, socket_timeout: float | None = None) -> None:
        try:
            super().collect(socket_timeout)
        finally:
            self._default_channel = None


class BrokerAMQP(AMQP):
    """Celery's AMQP with the connection class above (`Celery(amqp=...)`)."""

    Connection = BrokerConnection
