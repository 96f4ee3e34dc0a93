"""The dashboard's Nodes table in chromium (Playwright), on a real server on loopback: two
nodes registered and claiming through the worker routes, one with a GPU whose reading came
with a heartbeat. Admins see every node's jobs; an organiser sees its challenges' jobs and
only a count of the others; reviewers are not shown the nodes. A GPU model that is markup
stays text.
"""

from __future__ import annotations

import httpx
import pytest

from engine.api.app import ApiOptions
from engine.api.ratelimit import Rate
from engine.web import create_site
from tests.api_fixtures import build_world, queued_submission, start_server
from tests.web_fixtures import (
    browser,  # noqa: F401  (the module's chromium fixture)
    serious_violations,
    sign_in,
    watched_page,
)

# ruff: noqa: F811  (pytest fixtures as arguments)

API = "/api/v1/worker"
HOSTILE_MODEL = '<img src=x onerror="alert(3)">H200'
GPU = {"uuid": "GPU-0b6e-web", "model": HOSTILE_MODEL, "driver": "550.54.15",
       "memory_bytes": 143_771_000_832}
SAMPLE = {"index": 0, "utilisation_percent": 93.0, "memory_used_mib": 30720.0,
          "power_watts": 455.0, "energy_millijoules": 7_200_000.0}


def _node_running_a_job(world, url: str, name: str, challenge: str, gpus: list) -> int:
    """A node registers and claims `challenge`'s fresh smoke job; returns the job id."""
    queued_submission(world, challenge, "team-a" if challenge == "ch-a" else "team-c")
    with httpx.Client(base_url=url, timeout=30,
                      headers={"Authorization": f"Bearer {world.tokens['worker']}"}) as worker:
        node_id = worker.post(f"{API}/nodes/register", json={
            "name": name, "gpu_slots": len(gpus), "cpu_slots": 1, "gpus": gpus,
            "facts": {}}).raise_for_status().json()["node_id"]
        claim = worker.post(f"{API}/jobs/claim", json={"node_id": node_id, "wait_seconds": 0})
        assert claim.status_code == 201, claim.text
        job_id = claim.json()["ticket"]["job_id"]
        if gpus:
            worker.post(f"{API}/jobs/{job_id}/heartbeat", json={
                "node_id": node_id, "gpus": {GPU["uuid"]: SAMPLE}}, headers={
                "Epreuve-Attempt": "1",
                "Epreuve-Attempt-Token": claim.json()["attempt_token"]}).raise_for_status()
    return job_id


@pytest.fixture(scope="module")
def site(module_tmp):
    world = build_world(module_tmp("nodes-web"), "sqlite")
    server = start_server(world, app=create_site(world.settings, ApiOptions(
        rate=Rate(burst=10_000, per_second=1000.0))))
    server.jobs = {"gpu-node-a": _node_running_a_job(world, server.url, "gpu-node-a", "ch-a",
                                                     [GPU]),
                   "cpu-node-b": _node_running_a_job(world, server.url, "cpu-node-b", "ch-b",
                                                     [])}
    yield server
    server.stop()


@pytest.mark.browser
def test_admins_see_every_node_with_its_gpus_readings_and_jobs(site, browser):
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, site.world.tokens["admin"])
    page.goto("/dashboard")
    row = page.locator("#nodes tr", has_text="gpu-node-a").inner_text()
    for expected in ("active", "1 / 1", HOSTILE_MODEL, "driver 550.54.15", "137111 MiB",
                     "93 %", "30720 MiB used", "455 W", "7200 J",  # the reading, in J
                     f"job {site.jobs['gpu-node-a']}"):
        assert expected in row.replace(",", ""), (expected, row)
    assert "ago" in row
    other = page.locator("#nodes tr", has_text="cpu-node-b").inner_text()
    assert f"job {site.jobs['cpu-node-b']}" in other and "none" in other  # no GPU
    assert serious_violations(page) == []
    watched.assert_quiet()  # the markup in the GPU model never ran


@pytest.mark.browser
def test_an_organiser_sees_its_jobs_on_each_node_and_counts_the_others(site, browser):
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, site.world.tokens["organiser-a"])
    page.goto("/dashboard")
    table = page.inner_text("#nodes")
    assert f"job {site.jobs['gpu-node-a']}" in table
    assert f"job {site.jobs['cpu-node-b']}" not in table
    assert "1 of other challenges" in page.locator("#nodes tr",
                                                   has_text="cpu-node-b").inner_text()
    watched.assert_quiet()


@pytest.mark.browser
def test_reviewers_are_not_shown_the_nodes(site, browser):
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, site.world.tokens["reviewer-a"])
    page.goto("/dashboard")
    assert page.locator("#nodes").count() == 0
    assert "shown to organisers and admins" in page.inner_text("main")
    watched.assert_quiet()


@pytest.mark.browser
def test_an_admin_retires_a_lost_node_with_its_button(site, browser):
    """A machine gone for good: the Retire button of a lost node with no job (none on the
    nodes running jobs), reachable from the keyboard; the node then leaves the table."""
    from engine import nodes
    from engine.node_description import validated

    with site.world.sessions() as session:
        gone = nodes.register(session, validated({
            "name": "gone-rack-3", "gpu_slots": 0, "cpu_slots": 1, "gpus": [], "facts": {}}),
            None, "test")
        gone.state = "lost"
        session.commit()
    watched = watched_page(browser, site.url)
    page = watched.page
    sign_in(watched, site.world.tokens["admin"])
    page.goto("/dashboard")
    assert page.locator("#nodes tr", has_text="gpu-node-a").locator("button").count() == 0
    button = page.locator("#nodes tr", has_text="gone-rack-3").get_by_role(
        "button", name="Retire node gone-rack-3")
    assert serious_violations(page) == []
    button.focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/dashboard#nodes")
    assert "gone-rack-3" not in page.inner_text("#nodes")
    watched.assert_quiet()
