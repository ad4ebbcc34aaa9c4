"""The policies pages in a real browser: every stored version with its YAML and the
runs it steers, a diff that shows the changed line, and the replay of a candidate
over recorded runs that lists the epochs it would decide otherwise."""

from __future__ import annotations

import re
from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.conftest import ConsoleThread, Trainer, screenshot
from tests.conftest import ServerThread
from trainer_client.api import control_pb2 as pb
from trainer_client.sim import SimulatedRun

#: The default document with one number changed: it tolerates one bad epoch, not three.
IMPATIENT_YAML = """\
name: impatient
plateau:
  patience: 1
"""


def test_versions_their_yaml_a_diff_and_a_replay_that_differs(
    server: ServerThread,
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
    page: Page,
) -> None:
    trainer = make_trainer(server)
    impatient = trainer.admin.PutPolicy(pb.PutPolicyRequest(yaml=IMPATIENT_YAML)).policy
    trainer.admin.SetShadowPolicy(pb.SetShadowPolicyRequest(version=impatient.version))
    for fold in range(2):
        run = SimulatedRun(
            f"heart-fold{fold}",
            labels={"dataset": "Heart", "fold": str(fold)},
            epochs=25,
            seed=fold,
        )
        trainer.start(run)
        trainer.train(run)
    default = trainer.admin.GetPolicy(pb.GetPolicyRequest())
    console = make_console(server)

    page.goto(console.url + "/policies")
    rows = page.locator("#policies tbody tr")
    expect(rows).to_have_count(2)
    active = page.locator(f'#policies tr[data-version="{default.version}"]')
    expect(active.locator(".state")).to_contain_text("active")
    expect(active.locator("td.num")).to_have_text("2")  # steers both runs
    screenshot(page, "policies")

    page.get_by_role("link", name=impatient.version).first.click()
    expect(page.locator("#policy-version")).to_have_text(impatient.version)
    expect(page.locator("#policy-yaml")).to_contain_text("patience: 1")
    expect(page.locator("#policy-yaml")).to_contain_text("name: impatient")
    expect(page.locator("#steers-count")).to_contain_text("0 runs")
    # As the shadow it was evaluated on every report of both runs (25 epochs each).
    expect(page.locator("#shadow-summary")).to_contain_text("on 50 reports")
    expect(page.locator("#shadow-transitions")).to_contain_text("NONE → INTERVENE")

    page.goto(f"{console.url}/policies/{default.version}")
    expect(page.locator("#policy-yaml")).to_contain_text("patience: 3")
    expect(page.locator("#steers-count")).to_contain_text("2 runs")
    expect(page.locator("#steered-runs tbody tr")).to_have_count(2)

    page.goto(console.url + "/policies/diff")
    page.get_by_label("From").select_option(default.version)
    page.get_by_label("To").select_option(impatient.version)
    page.get_by_role("button", name="Show diff").click()
    diff = page.locator("#policy-diff")
    expect(diff.locator(".diff-del", has_text=re.compile(r"^-\s+patience: 3$"))).to_have_count(1)
    expect(diff.locator(".diff-add", has_text=re.compile(r"^\+\s+patience: 1$"))).to_have_count(1)
    expect(diff.locator(".diff-add", has_text="name: impatient")).to_have_count(1)
    # Only what changed is marked: the cooldown is the same in both.
    expect(diff.locator(".diff-add, .diff-del", has_text="cooldown")).to_have_count(0)

    page.goto(console.url + "/policies/replay")
    page.get_by_label("or paste a policy's YAML").fill(IMPATIENT_YAML)
    page.get_by_label("Dataset").fill("Heart")
    page.get_by_role("button", name="Replay").click()
    expect(page.locator("#replay-counts")).to_contain_text("2 runs")
    differing = page.locator("#replay-differences tbody tr")
    expect(differing.first).to_be_visible()
    assert differing.count() >= 1
    first = differing.first
    expect(first.locator("td").nth(0)).to_contain_text("heart-fold")
    # The recorded and the candidate action of a differing epoch are not the same.
    cells = first.locator("td")
    assert cells.nth(2).inner_text() != cells.nth(5).inner_text() or (
        cells.nth(3).inner_text() != cells.nth(6).inner_text()
    )
    expect(page.locator("#replay-transitions")).to_contain_text("→")


def test_a_replay_of_a_broken_document_shows_the_servers_words_beside_the_form(
    server: ServerThread, make_console: Callable[[ServerThread], ConsoleThread], page: Page
) -> None:
    console = make_console(server)
    page.goto(console.url + "/policies/replay")
    page.get_by_label("or paste a policy's YAML").fill("plateau:\n  patience: -4\n")
    page.get_by_role("button", name="Replay").click()
    expect(page.locator("#replay-error")).to_contain_text("INVALID_ARGUMENT")
    expect(page.locator("#replay-error")).to_contain_text("patience")
    expect(page.get_by_label("or paste a policy's YAML")).to_have_value(
        "plateau:\n  patience: -4\n"
    )
