"""The audit page in a real browser: who did what, newest first, narrowed by actor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page, expect

from control_server.auth import Role
from control_server.tokens import create_token
from tests.browser.conftest import ConsoleThread, Trainer
from tests.conftest import ServerThread
from trainer_client.api import control_pb2 as pb
from trainer_client.sim import SimulatedRun


def test_filtering_by_actor_narrows_the_audit_to_that_persons_calls(
    tmp_path: Path,
    make_server: Callable[..., ServerThread],
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
    page: Page,
) -> None:
    path = tmp_path / "tokens.json"
    alice = create_token(path, "alice", Role.OPERATOR)[0]
    root = create_token(path, "root", Role.ADMIN)[0]
    trainer_token = create_token(path, "trainer", Role.TRAINER)[0]
    server = make_server(auth_file=path)
    trainer = make_trainer(server, trainer_token)
    run = SimulatedRun("lung-fold0", labels={"dataset": "Lung"}, epochs=5)
    trainer.start(run)
    trainer.train(run, 2)
    as_alice = (("authorization", f"Bearer {alice}"),)
    as_root = (("authorization", f"Bearer {root}"),)
    trainer.admin.SetOverride(
        pb.SetOverrideRequest(run_id=run.state.run_id, hold_interventions=True, reason="look"),
        metadata=as_alice,
    )
    trainer.admin.ClearOverride(pb.ClearOverrideRequest(run_id=run.state.run_id), metadata=as_alice)
    trainer.admin.PutPolicy(pb.PutPolicyRequest(yaml="name: other\n"), metadata=as_root)
    console = make_console(server)

    page.goto(console.url + "/signin?next=/audit")
    page.get_by_label("Token").fill(root)
    page.get_by_role("button", name="Sign in").click()
    rows = page.locator("#audit tbody tr.audit-event")
    expect(rows.locator(".actor", has_text="root").first).to_be_visible()
    expect(rows.locator(".actor", has_text="alice")).to_have_count(2)
    # Newest first: root's PutPolicy came after alice's two calls.
    assert rows.locator(".action").all_inner_texts().index("PutPolicy") < (
        rows.locator(".action").all_inner_texts().index("SetOverride")
    )

    page.get_by_label("Actor").fill("alice")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(2)
    expect(rows.locator(".actor")).to_have_text(["alice", "alice"])
    expect(rows.locator(".action")).to_have_text(["ClearOverride", "SetOverride"])
    expect(rows.locator(".target")).to_have_text([run.state.run_id, run.state.run_id])
    expect(page.get_by_label("Actor")).to_have_value("alice")
    rows.first.locator("summary").click()
    expect(rows.first.locator("code.json")).to_contain_text(run.state.run_id)

    page.get_by_label("Action").fill("PutPolicy")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#audit tbody")).to_contain_text("No events match")

    # A time after every event leaves none; a time that is not one is named as typed.
    page.get_by_label("Action").fill("")
    page.get_by_label("Since (UTC)").fill("2999-01-01T00:00")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#audit tbody")).to_contain_text("No events match")
    page.get_by_label("Since (UTC)").fill("yesterday")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("alert").filter(has_text="since")).to_contain_text(
        "since must be a time such as 2026-12-06T01:00 (UTC), but got 'yesterday'."
    )
