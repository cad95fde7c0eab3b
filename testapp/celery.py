"""The test project's Celery app, as the tutorial's `mysite/celery.py`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testapp.settings")

app = Celery("testapp", amqp="sagas.broker:BrokerAMQP")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
