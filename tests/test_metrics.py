"""Prometheus metrics (`sagas.metrics`): counted by real worker processes, served by the
worker's main process and by the web process's view, and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from sagas.metrics import instruments
from sagas.metrics.database import IN_FLIGHT, in_flight_sql
from sagas.metrics.worker import process_gone
from sagas.models import Saga
from sagas.services import saga_start
from tests.conftest import ROOT, lose_messages, wait_final, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return parse(text)


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.django_db(transaction=True)
def test_the_worker_counts_a_real_saga_from_its_pool_processes(saga_db, worker_metrics):
    """A saga that retries a step then completes, and one that compensates, run by the suite's
    workers (two nodes, two pool processes each): the worker's server shows what they did."""
    url = worker_metrics["url"]
    before = wait_for(lambda: _scrape_or_none(url), timeout=30, what="the worker's metrics")
    retried, _ = saga_start(name="flaky_then_fine", input={})
    compensated, _ = saga_start(name="declines_second", input={})
    assert wait_final(retried.pk).status == "completed"
    assert wait_final(compensated.pk).status == "compensated"

    expected = {
        ("sagas_completed_total", ("flaky_then_fine",)): 1,
        ("sagas_step_attempts_total", ("flaky_then_fine", "flaky")): 2,
        ("sagas_step_retries_total", ("flaky_then_fine", "flaky")): 1,
        ("sagas_step_duration_seconds_count", ("flaky_then_fine", "flaky")): 1,
        ("sagas_step_duration_seconds_count", ("flaky_then_fine", "after")): 1,
        ("sagas_compensated_total", ("declines_second",)): 1,
        ("sagas_step_failures_total", ("declines_second", "second", "declined")): 1,
        ("sagas_compensations_total", ("declines_second", "first")): 1,
    }

    def grown() -> dict | None:
        after = scrape(url)
        found = {key: _delta(before, after, *key) for key in expected}
        return found if found == expected else None

    # The counters move after each commit: a moment after the saga's final state is visible.
    wait_for(grown, timeout=10, what="the counters to count both sagas")
    # Counted in the pool processes: each writes a file of its own, named by its pid; a
    # node's main process holds only the series it created at 0 (instruments.zero_series).
    mains = {proc.pid for proc in saga_db.procs}
    children = {c.pid for pid in mains for c in psutil.Process(pid).children()}
    files = {
        int(f.stem.rsplit("_", 1)[1]): f for f in Path(worker_metrics["dir"]).glob("counter_*.db")
    }
    counting = {pid for pid, f in files.items() if any(counter_values(f))}
    assert counting & children, (counting, children)
    assert not counting & mains
    assert set(files) & mains, "a main process created no series at 0"


def counter_values(path: Path) -> list[float]:
    """The values in a counter file of prometheus-client's multiprocess mode."""
    return [value for _, value, _, _ in MmapedDict.read_all_values_from_file(str(path))]


def _scrape_or_none(url: str) -> Samples | None:
    try:
        return scrape(url)
    except OSError:
        return None


def _delta(before: Samples, after: Samples, name: str, values: tuple[str, ...]) -> float:
    names = ("definition", "step", "code")[: len(values)]
    labels = dict(zip(names, values, strict=True))
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.django_db
def test_the_web_view_serves_its_counters_and_the_gauges_of_the_database(
    client, monkeypatch, settings, django_capture_on_commit_callbacks
):
    lose_messages(monkeypatch)
    started = REGISTRY.get_sample_value("sagas_started_total", {"definition": "three_steps"}) or 0
    with django_capture_on_commit_callbacks(execute=True):
        saga, _ = saga_start(name="three_steps", input={})
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = parse(response.content.decode())
    assert value(samples, "sagas_started_total", definition="three_steps") == started + 1
    assert value(samples, "sagas_in_flight", definition="three_steps", status="running") == 1
    assert value(samples, "sagas_stalled", definition="three_steps") == 1
    assert value(samples, "sagas_oldest_progress_age_seconds", definition="three_steps") >= 3600

    settings.SAGAS_METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer nope").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


@pytest.mark.django_db
def test_an_idle_system_reads_zero_not_no_data(client):
    """Every registered definition's series exist before their first increment, and the
    gauges read 0 with nothing in flight: a dashboard shows 0, and rate() counts the first."""
    Saga.objects.all().delete()
    samples = parse(client.get("/metrics").content.decode())
    present = {(name, dict(labels).get("definition")) for name, labels in samples}
    for name in (
        "sagas_started_total",
        "sagas_dead_lettered_total",
        "sagas_step_attempts_total",
        "sagas_compensation_failures_total",
        "sagas_stalled",
        "sagas_oldest_progress_age_seconds",
    ):
        assert (name, "three_steps") in present, f"no {name} series for three_steps"
    running = ("sagas_in_flight", (("definition", "three_steps"), ("status", "running")))
    assert samples[running] == 0
    assert value(samples, "sagas_stalled", definition="three_steps") == 0


@pytest.mark.django_db
def test_the_gauges_read_the_sagas_in_flight_through_the_status_index():
    """The gauges' statement is served by the index of the sagas in flight: it reads them, not
    the table's history."""
    from tests.conftest import finished_sagas

    finished_sagas(3000)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + in_flight_sql(), [timezone.now(), *IN_FLIGHT])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "saga_in_flight_idx" in plan and "Seq Scan" not in plan, plan


def test_a_pool_process_that_exits_takes_its_live_gauges_and_leaves_its_counters(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for name in ("gauge_livesum_4242.db", "counter_4242.db", "gauge_livesum_4343.db"):
        (tmp_path / name).write_bytes(b"")
    process_gone(pid=4242, exitcode=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_4242.db",
        "gauge_livesum_4343.db",
    ]


def test_the_grafana_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    metrics = [m for m in vars(instruments).values() if isinstance(m, Counter | Histogram)]
    names = {f"{m._name}_total" if isinstance(m, Counter) else m._name for m in metrics}
    names |= {"sagas_in_flight", "sagas_stalled", "sagas_oldest_progress_age_seconds"}
    names |= {"sagas_waiting", "sagas_waits_overdue", "sagas_oldest_wait_age_seconds"}
    names |= {"sagas_discrepant"}
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b(sagas_[a-z_]+)", target["expr"]):
                queried.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert queried <= names, queried - names
    # Every metric has a panel.
    assert names <= queried, names - queried
