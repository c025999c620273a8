"""The dashboard in a real browser: headless Chromium (Debian's) against a real server.

The page opens and goes live; profiles posted after it opened show up in its charts, a
webhook that refuses one of them shows up as a recent failure with its error, and a match
task stuck in a hung worker process shows up as running, with a cancel button that cancels
it (the worker is killed, the next task runs).

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`,
which .ci/run does). Without them this test fails: it is part of the suite, not optional.
Set DASHBOARD_SCREENSHOT=docs/dashboard.png to also save the screenshot for the README.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Server, Webhook, exited, profile, wait_for_task
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
)
WAIT_S = 20


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install chromium chromium-driver (.ci/run does)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def webhook() -> Iterator[str]:
    """A webhook receiver on loopback: 200 for every profile, 503 for those named `flaky-*`."""
    with Webhook(lambda body: 503 if body["user_id"].startswith("flaky") else 200) as hook:
        yield hook.url


def worker_processes(server: Server) -> list[int]:
    """The server's process-task workers (anyio's), from /proc."""
    assert server.process is not None
    children = [
        int(pid)
        for path in Path(f"/proc/{server.process.pid}/task").glob("*/children")
        for pid in path.read_text().split()
    ]
    return [pid for pid in children if b"anyio.to_process" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def post(server: Server, user_id: str, interests: list[str], bio: str) -> str:
    response = server.post("/profile", json=profile(user_id, interests, bio, name=user_id.title()))
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def row(driver: WebDriver, table: str, task_id: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, f'#{table} tr[data-task-id="{task_id}"]')


def test_the_dashboard_shows_a_new_task_and_cancels_it(
    make_server: Callable[..., Server], browser: WebDriver, webhook: str, tmp_path: Path
) -> None:
    server = make_server(PROFILE_APP_PROCESS_WORKERS="1", PROFILE_APP_WEBHOOK_URL=webhook)
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)

    browser.get(server.url + "/dashboard")
    wait.until(lambda d: d.find_element(By.ID, "connection").get_attribute("data-state") == "live")
    assert browser.find_element(By.ID, "queued-count").text == "0"

    # Profiles posted after the page opened: their matches and webhooks succeed, but one.
    interests = [["chess", "go"], ["chess", "hiking"], ["go", "jazz"], ["hiking", "jazz", "chess"]]
    matches = [post(server, f"user-{n}", interests[n % 4], "I like long walks and chess") for n in range(8)]
    matches.append(post(server, "flaky-receiver", ["chess"], "my webhook is down"))
    for task_id in matches:
        assert wait_for_task(server, task_id)["status"] == "succeeded"
    flaky_notify = _notify_tasks(server)[0]["task_id"]  # the newest: the flaky match queued it
    assert wait_for_task(server, flaky_notify)["status"] == "failed"
    wait.until(lambda d: row(d, "failures", flaky_notify))
    [failure] = row(browser, "failures", flaky_notify)
    assert "503 Server Error" in failure.text

    # A hung worker: the next match task is stuck in it, running; match tasks are short, so
    # the one after is claimed ahead for that worker (running too), and the third waits.
    [worker] = worker_processes(server)
    os.kill(worker, signal.SIGSTOP)
    stuck = post(server, "stuck", ["chess"], "a worker that hangs")
    ahead = post(server, "ahead", ["go"], "claimed ahead, waiting for the worker")
    waiting = post(server, "waiting", ["go"], "queued behind both")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#running button.cancel[data-task-id="{stuck}"]'))
    wait.until(lambda d: row(d, "running", ahead) and row(d, "queued", waiting))
    assert browser.find_element(By.ID, "running-count").text == "2"
    assert row(browser, "running", stuck)[0].find_element(By.CSS_SELECTOR, "a.task").text == stuck[:8]
    _save_screenshot(browser, tmp_path)

    browser.find_element(By.CSS_SELECTOR, f'#running button.cancel[data-task-id="{stuck}"]').click()

    wait.until(lambda d: f"Task {stuck} cancelled." in d.find_element(By.ID, "notice").text)
    assert server.get(f"/tasks/{stuck}").json()["status"] == "cancelled"
    wait.until(lambda d: not row(d, "running", stuck))
    deadline = time.monotonic() + 2
    while not exited(worker):
        assert time.monotonic() < deadline, "the cancelled task's worker process was not killed"
        time.sleep(0.02)
    for task_id in (ahead, waiting):
        assert wait_for_task(server, task_id)["status"] == "succeeded"  # in a fresh worker
    wait.until(lambda d: not row(d, "queued", waiting) and not row(d, "running", waiting))

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def _notify_tasks(server: Server) -> list[dict]:
    return server.get("/tasks", params={"kind": "notify"}).json()["tasks"]


def _save_screenshot(driver: WebDriver, tmp_path: Path) -> None:
    path = tmp_path / "dashboard.png"
    assert driver.save_screenshot(str(path))
    if target := os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copyfile(path, target)
