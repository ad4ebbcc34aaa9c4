"""The run page and the compare page in Chromium: a simulated collapse that the guard
rolls back, an operator's override, the chart with its markers, the hover area that
reads a decision's reason (mouse and keyboard), a decision arriving without a reload,
and two runs overlaid."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote

from playwright.sync_api import Page, expect

from control_server.console.run_page import json_script
from tests.browser.conftest import ConsoleThread, Trainer, screenshot
from tests.browser.test_fleet import nnunet_id, script_errors, sim
from tests.conftest import ServerThread
from trainer_client.api import control_pb2 as pb


def test_run_page_charts_marks_and_explains_each_decision_live(
    server: ServerThread,
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
    page: Page,
) -> None:
    trainer = make_trainer(server)
    run = sim(nnunet_id("Dataset042_Disc", "3d_fullres", 1), scenario="collapse", epochs=45)
    trainer.start(run)
    decisions = trainer.train(run, 34)  # interventions at 18 and 31, the guard's rollback at 32
    steered = {d.epoch: pb.Action.Name(d.action) for d in decisions if d.action != pb.NONE}
    assert steered == {18: "INTERVENE", 31: "INTERVENE", 32: "ROLLBACK"}
    trainer.admin.SetOverride(
        pb.SetOverrideRequest(
            run_id=run.state.run_id, lr=0.004, once=True, reason="try a lower LR after the collapse"
        ),
        timeout=10,
    )
    trainer.train(run, 2)  # epoch 34: the override's intervention
    console = make_console(server)
    errors = script_errors(page)
    page.goto(f"{console.url}/runs/{quote(run.state.run_id)}")

    expect(page.locator("#chart canvas")).to_have_count(1)
    markers = page.locator("#markers button")
    expect(markers).to_have_text(
        [
            "▲ intervention #1 at epoch 18",
            "▲ intervention #2 at epoch 31",
            "✕ rollback (guard) at epoch 32",
            "◆ override at epoch 34",
        ]
    )
    expect(page.locator("#run-flags")).to_contain_text("rolled back")
    table = page.locator("#decisions tbody")
    intervention = decisions[18].reason
    expect(table.locator('tr[data-epoch="18"]')).to_contain_text(intervention)
    expect(table.locator('tr[data-epoch="32"]')).to_contain_text("Divergence guard")
    expect(table.locator('tr[data-epoch="34"]')).to_contain_text("try a lower LR")
    expect(page.locator("#overrides tbody")).to_contain_text("try a lower LR")
    expect(page.locator("#attempts tbody tr")).to_have_count(1)

    # The mouse over the chart at epoch 18: the hover area reads that decision.
    over = page.locator("#chart .u-over").bounding_box()
    assert over is not None
    x = page.evaluate("TCRun.chart.valToPos(18, 'x')")
    page.mouse.move(over["x"] + x, over["y"] + over["height"] / 2)
    hover = page.locator("#hover")
    expect(hover).to_contain_text("Epoch 18: INTERVENE (policy)")
    expect(hover).to_contain_text(intervention)
    # The keyboard does the same: focus the chart, step with the arrow keys.
    page.locator("#chart-box").focus()
    page.keyboard.press("End")
    expect(hover).to_contain_text("Epoch 35:")
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    expect(hover).to_contain_text("Epoch 32: ROLLBACK (safety)")
    # ... and each marker's button.
    markers.nth(0).focus()
    page.keyboard.press("Enter")
    expect(hover).to_contain_text(intervention)
    screenshot(page, "run")

    # A new decision reaches table, chart and summary without a reload.
    page.evaluate("window.marker = 1")
    trainer.train(run, 6)  # a plateau again after the override: intervention 3 by epoch 41
    assert run.epoch == 42
    expect(page.locator("#run-epoch")).to_have_text("41")
    expect(table.locator("tr[data-epoch]")).to_have_count(5)
    assert page.evaluate("TCRun.data().epochs.length") == 42
    assert page.evaluate("window.marker") == 1, "the page was reloaded"
    assert errors == []


def test_compare_overlays_the_folds_of_a_dataset(
    server: ServerThread,
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
    page: Page,
) -> None:
    trainer = make_trainer(server)
    folds = [
        sim(nnunet_id("Dataset042_Disc", "3d_fullres", f), epochs=12, seed=f) for f in range(3)
    ]
    for run in folds:
        trainer.start(run)
        trainer.train(run)
        trainer.finish(run)
    console = make_console(server)
    errors = script_errors(page)
    page.goto(f"{console.url}/runs/{quote(folds[0].state.run_id)}")
    page.locator("#compare-folds").click()
    expect(page.locator("#compared tbody tr")).to_have_count(3)
    legend = page.locator("#compare-chart .u-legend")
    for fold, run in enumerate(folds):
        expect(legend).to_contain_text(f"fold {fold}: ")
        expect(page.locator("#compared tbody")).to_contain_text(run.state.run_id)
    assert page.evaluate("TCCompare.chart.series.length") == 4  # epochs + 3 runs

    # Picking two runs by hand and another curve.
    page.goto(console.url + "/compare")
    page.get_by_label(re.compile(r"fold_0 fold 0")).check()
    page.get_by_label(re.compile(r"fold_2 fold 2")).check()
    page.select_option("#c-metric", "pseudo_dice")
    page.locator("#compare-form button[type=submit]").click()
    expect(page.locator("#overlay-h")).to_have_text("pseudo_dice of 2 runs")
    expect(legend).to_contain_text("fold 2: ")
    assert errors == []


def test_chart_data_cannot_close_its_script_element() -> None:
    text = json_script({"reason": "</script><script>alert(1)</script> & <!--"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert "\\u003c/script\\u003e" in text
