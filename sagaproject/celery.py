"""The Celery application: configured from Django settings, tasks discovered in every app."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")

# The broker connection class, with a crash on reconnection to Redis worked around (see
# sagas.broker); `amqp` is the app's AMQP class:
# https://docs.celeryq.dev/en/stable/reference/celery.html#celery.Celery
app = Celery("sagaproject", amqp="sagas.broker:BrokerAMQP")
# https://docs.celeryq.dev/en/stable/django/first-steps-with-django.html
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
