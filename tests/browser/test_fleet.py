"""The fleet page in Chromium: runs of every kind on a real server, their status words
and health flags, a decision arriving without a reload, sorting by keyboard, filters;
and the pure helpers that turn a RunSummary into a row."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Locator, Page, expect

from control_server.console.fleet import short_id, sparkline, split_run_id
from tests.browser.conftest import ConsoleThread, Trainer, screenshot
from tests.conftest import ServerThread
from trainer_client.api import control_pb2 as pb
from trainer_client.sim import SimulatedRun

TRAINER = "nnUNetTrainerControlled"


def nnunet_id(dataset: str, configuration: str, fold: int) -> str:
    return f"{dataset}__{TRAINER}__nnUNetPlans__{configuration}__fold_{fold}"


def sim(run_id: str, **knobs: Any) -> SimulatedRun:
    """A simulated run labelled as nnU-Net would label it (labels read from its id)."""
    labels = split_run_id(run_id)
    labels.pop("plans", None)
    return SimulatedRun(run_id, labels=labels, **knobs)


def fail(trainer: Trainer, run: SimulatedRun, error: str) -> None:
    trainer.control.FinishRun(
        pb.FinishRunRequest(run_id=run.state.run_id, status=pb.FAILED, error=error), timeout=10
    )


def script_errors(page: Page) -> list[str]:
    """The page's uncaught script errors from now on (a test ends asserting none)."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def row(page: Page, run_id: str) -> Locator:
    return page.locator(f'#fleet tbody tr[data-run="{run_id}"]')


def test_fleet_shows_each_run_status_and_flags_and_takes_decisions_live(
    server: ServerThread,
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
    page: Page,
) -> None:
    trainer = make_trainer(server)
    done = sim(nnunet_id("Dataset042_Disc", "3d_fullres", 0), epochs=30)
    collapsed = sim(nnunet_id("Dataset042_Disc", "3d_fullres", 1), scenario="collapse", epochs=34)
    spent = sim(nnunet_id("Dataset042_Disc", "2d", 0), escape=0.0, epochs=44)
    failed = sim(nnunet_id("Dataset007_Prostate", "3d_lowres", 2), epochs=40)
    live = sim(nnunet_id("Dataset007_Prostate", "3d_lowres", 3), epochs=40)
    nan = sim(nnunet_id("Dataset007_Prostate", "2d", 0), epochs=40)
    steered = sim(nnunet_id("Dataset042_Disc", "3d_fullres", 2), epochs=40)
    stopped = sim(nnunet_id("Dataset042_Disc", "3d_fullres", 3), epochs=40)
    for run in (done, collapsed, spent, failed, live, nan, steered, stopped):
        trainer.start(run)
    trainer.train(done)
    trainer.finish(done, dice=0.84)
    trainer.train(collapsed)  # the guard rolls intervention 2 back at epoch 32
    trainer.finish(collapsed, dice=0.79)
    trainer.train(spent)  # 3 interventions, then a plateau with the budget spent
    trainer.train(failed, 9)
    fail(trainer, failed, "CUDA out of memory")
    trainer.train(live, 12)
    trainer.train(nan, 6)
    report = nan.next_report()
    report.train_loss = math.nan
    nan.apply(trainer.control.ReportEpoch(report, timeout=10))
    trainer.train(steered, 8)
    trainer.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id=steered.state.run_id, hold_interventions=True, reason="hold: new data"
        ),
        timeout=10,
    )
    trainer.train(stopped, 15)
    trainer.finish(stopped, status=pb.STOPPED, dice=0.61)

    console = make_console(server)
    errors = script_errors(page)
    page.goto(console.url + "/")
    expect(page.locator("#fleet-count")).to_contain_text("8 runs")

    def status(run: SimulatedRun) -> Locator:
        return row(page, run.state.run_id).locator('[data-col="status"]')

    def flags(run: SimulatedRun) -> Locator:
        return row(page, run.state.run_id).locator('[data-col="flags"]')

    expect(status(done)).to_have_text(re.compile(r"completed"))
    expect(status(collapsed)).to_have_text(re.compile(r"completed"))
    expect(status(failed)).to_have_text(re.compile(r"failed"))
    expect(status(stopped)).to_have_text(re.compile(r"stopped"))
    expect(status(live)).to_have_text(re.compile(r"active"))
    # Each status carries a symbol besides its word: readable without colour.
    expect(status(failed)).to_have_text(re.compile(r"✗\s*failed"))

    expect(flags(collapsed)).to_contain_text("rolled back")
    expect(flags(collapsed).locator('[data-flag="rolled-back"]')).to_have_attribute(
        "title", re.compile(r"1 rollback")
    )
    expect(flags(done)).not_to_contain_text("rolled back")
    expect(flags(spent)).to_contain_text("budget spent")
    expect(flags(nan)).to_contain_text("non-finite")
    expect(flags(steered)).to_contain_text("override")
    expect(row(page, collapsed.state.run_id).locator('[data-col="rollbacks"]')).to_have_text("1")
    # nnU-Net's long ids read as label columns, the id itself shortened with the full id
    # in its title; the sparkline says what it draws.
    link = row(page, done.state.run_id).locator("th a")
    expect(link).to_have_attribute("title", done.state.run_id)
    expect(row(page, done.state.run_id).locator("td").nth(1)).to_have_text("Dataset042_Disc")
    expect(row(page, done.state.run_id).locator(".spark svg")).to_have_attribute(
        "aria-label", re.compile(r"^val_loss from 0\.\d+ to 0\.\d+")
    )
    screenshot(page, "fleet")

    # A decision arrives: the row changes in place, no navigation.
    page.evaluate("window.marker = 1")
    epoch = row(page, live.state.run_id).locator('[data-col="epoch"]')
    expect(epoch).to_have_text("11")
    trainer.step(live)
    expect(epoch).to_have_text("12")
    # A run the page has not seen yet appears (the table body is re-read).
    newcomer = sim(nnunet_id("Dataset007_Prostate", "3d_lowres", 4), epochs=5)
    trainer.start(newcomer)
    trainer.train(newcomer, 2)
    expect(row(page, newcomer.state.run_id)).to_have_count(1)
    expect(page.locator("#fleet-count")).to_contain_text("9 runs")
    # A burst of new runs re-reads the table a few times, not once per decision.
    rereads: list[str] = []
    page.on("request", lambda r: rereads.append(r.url) if "/fleet/rows" in r.url else None)
    burst = [sim(nnunet_id("Dataset099_Burst", "2d", fold), epochs=5) for fold in range(5)]
    for run in burst:
        trainer.start(run)
        trainer.train(run, 4)
    for run in burst:
        expect(row(page, run.state.run_id).locator('[data-col="epoch"]')).to_have_text("3")
    assert 1 <= len(rereads) <= 3, rereads
    assert page.evaluate("window.marker") == 1, "the page was reloaded"
    assert errors == []


def test_fleet_sorts_by_keyboard_and_filters_by_status(
    server: ServerThread,
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
    page: Page,
) -> None:
    trainer = make_trainer(server)
    runs = [sim(nnunet_id("Dataset042_Disc", "2d", fold), epochs=20) for fold in range(3)]
    for run, epochs in zip(runs, (7, 3, 12), strict=True):
        trainer.start(run)
        trainer.train(run, epochs)
    trainer.finish(runs[1], dice=0.7)
    console = make_console(server)
    errors = script_errors(page)
    page.goto(console.url + "/")
    order = page.locator("#fleet tbody tr")
    expect(order).to_have_count(3)

    def epochs() -> list[str]:
        return [
            t.strip() for t in page.locator('#fleet tbody [data-col="epoch"]').all_inner_texts()
        ]

    sort = page.locator("#fleet thead th", has_text="Epoch").locator("button.sort")
    sort.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#fleet thead th", has_text="Epoch")).to_have_attribute(
        "aria-sort", "ascending"
    )
    assert epochs() == ["2", "6", "11"]
    page.keyboard.press("Enter")
    assert epochs() == ["11", "6", "2"]

    page.select_option("#f-status", "completed")
    page.locator("#fleet-filters button[type=submit]").click()
    expect(order).to_have_count(1)
    expect(order.first).to_have_attribute("data-run", runs[1].state.run_id)
    expect(page.locator("#fleet-count")).to_contain_text("1 run,")
    page.select_option("#f-status", "active")
    page.locator("#fleet-filters button[type=submit]").click()
    expect(order).to_have_count(2)
    assert "status=active" in page.url

    # Ticking two runs and "Compare selected" opens them overlaid.
    page.locator(f'input[name="run"][value="{runs[0].state.run_id}"]').check()
    page.locator(f'input[name="run"][value="{runs[2].state.run_id}"]').check()
    page.locator("#compare-selected").click()
    expect(page.locator("#compared tbody tr")).to_have_count(2)
    assert errors == []


def test_sparkline_says_what_it_draws() -> None:
    line = sparkline([0.91, 0.6, 0.42], "val_loss")
    assert line is not None
    assert line.label == "val_loss from 0.91 to 0.42 (lowest 0.42, highest 0.91)"
    # Higher values are drawn higher: the first point (0.91) is at the top (small y).
    first, last = (p.split(",") for p in line.points.split()[::2])
    assert float(first[1]) < float(last[1])
    assert sparkline([0.5], "val_loss") is None
    assert sparkline([math.nan, 0.3], "val_loss") is None


@pytest.mark.parametrize(
    ("run_id", "expected"),
    [
        (
            "Dataset042_Disc__nnUNetTrainerControlled__nnUNetPlans__3d_fullres__fold_all",
            {
                "dataset": "Dataset042_Disc",
                "trainer": "nnUNetTrainerControlled",
                "plans": "nnUNetPlans",
                "configuration": "3d_fullres",
                "fold": "all",
            },
        ),
        ("my-run-7", {}),
    ],
)
def test_nnunet_run_ids_are_read_into_labels(run_id: str, expected: dict[str, str]) -> None:
    assert split_run_id(run_id) == expected
    assert len(short_id(run_id)) <= 30
