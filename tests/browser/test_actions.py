"""Actions in the console, clicked through in a real browser against a real server
with tokens: each confirmation names what it changes, an override set by a signed-in
person reaches the trainer's next decision and the audit names that person, an
operator cannot do what only an admin may (the server says so, and nothing changes),
an admin activates a policy, and an experiment is started, reported and promoted."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from control_server.auth import Role
from control_server.console.actions import FormError, parse_lr, parse_weights
from control_server.tokens import create_token
from tests.browser.conftest import ConsoleThread, Trainer, screenshot
from tests.conftest import ServerThread
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.sim import SimulatedRun

#: A second policy version: the default with a shorter patience.
EAGER_YAML = """\
name: eager
plateau:
  patience: 1
"""


@dataclass
class Setup:
    server: ServerThread
    console: ConsoleThread
    trainer: Trainer
    admin: pb_grpc.ControlAdminStub
    tokens: dict[str, str]

    def as_(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[name]}"),)


@pytest.fixture
def setup(
    tmp_path: Path,
    make_server: Callable[..., ServerThread],
    make_console: Callable[[ServerThread], ConsoleThread],
    make_trainer: Callable[..., Trainer],
) -> Setup:
    """A server with tokens for alice (operator), root (admin) and a trainer; the
    console in front of it; an admin stub for checks behind the browser's back."""
    path = tmp_path / "tokens.json"
    tokens = {
        "alice": create_token(path, "alice", Role.OPERATOR)[0],
        "root": create_token(path, "root", Role.ADMIN)[0],
        "trainer": create_token(path, "trainer", Role.TRAINER)[0],
    }
    server = make_server(auth_file=path)
    trainer = make_trainer(server, tokens["trainer"])
    return Setup(server, make_console(server), trainer, trainer.admin, tokens)


def sign_in(page: Page, console: ConsoleThread, token: str, name: str, then: str) -> None:
    """Through the sign-in form, as a person would: type the token, press Sign in; the
    console then shows `then`."""
    page.goto(f"{console.url}/signin?next={then}")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signed-in-as")).to_contain_text(name)


def test_an_override_set_in_the_console_steers_the_next_decision_and_names_its_setter(
    setup: Setup, page: Page
) -> None:
    run = SimulatedRun(
        "liver-3d-fold0", labels={"dataset": "Liver", "fold": "0"}, epochs=30, initial_lr=0.05
    )
    setup.trainer.start(run)
    setup.trainer.train(run, 3)
    sign_in(page, setup.console, setup.tokens["alice"], "alice", f"/runs/{run.state.run_id}")

    # A confirmation cancelled with Esc changes nothing.
    page.get_by_role("button", name="Stop at next report…").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        f"Stop run {run.state.run_id} at its next report"
    )
    page.keyboard.press("Escape")
    expect(page).to_have_url(re.compile(f"/runs/{run.state.run_id}$"))
    assert setup.trainer.step(run).action == pb.NONE

    actions = page.locator("#run-actions")
    actions.get_by_label("LR", exact=True).fill("0.02")
    actions.get_by_label("Hold interventions").check()
    actions.get_by_label("Reason", exact=True).fill("escape the plateau by hand")
    actions.get_by_role("button", name="Set override…").click()

    # Nothing has changed yet: the confirmation names the run and says what will.
    what = page.locator("#confirm-what")
    expect(what).to_contain_text(f"Set override on run {run.state.run_id}")
    expect(what).to_contain_text("LR 0.02")
    expect(what).to_contain_text("hold interventions")
    assert not setup.admin.ListOverrides(
        pb.ListOverridesRequest(run_id=run.state.run_id), metadata=setup.as_("root")
    ).overrides
    expect(page.locator("#confirm-yes")).to_be_focused()
    page.keyboard.press("Enter")

    expect(page).to_have_url(re.compile(f"/runs/{run.state.run_id}$"))
    expect(page.locator("#flash")).to_contain_text(
        re.compile(rf"override \d+ set on run {run.state.run_id} by alice")
    )
    expect(page.locator("#override-in-force")).to_be_visible()

    decision = setup.trainer.step(run)
    assert decision.source == pb.OVERRIDE
    assert decision.lr == pytest.approx(0.02)

    # Cleared, then the override's LR rolled back at the next report, both confirmed.
    page.get_by_role("button", name="Clear override…").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        f"Clear the active override of run {run.state.run_id}"
    )
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text(f"override of run {run.state.run_id} cleared")
    expect(page.locator("#override-in-force")).to_have_count(0)
    page.get_by_role("button", name="Roll back at next report…").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        f"Rollback run {run.state.run_id} at its next report"
    )
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text(
        re.compile(
            rf"ROLLBACK \d+ set on run {run.state.run_id} by alice "
            r"\(undoes the intervention of epoch \d+\)"
        )
    )
    rolled_back = setup.trainer.step(run)
    assert (rolled_back.action, rolled_back.source) == (pb.ROLLBACK, pb.OVERRIDE)

    audit = setup.admin.ListAuditEvents(
        pb.ListAuditEventsRequest(action="SetOverride"), metadata=setup.as_("root")
    )
    assert [(e.actor, e.target, e.result) for e in audit.events] == [
        ("alice", run.state.run_id, "OK")
    ] * 2
    page.goto(setup.console.url + "/audit?action=SetOverride")
    rows = page.locator("#audit tbody tr.audit-event")
    expect(rows).to_have_count(2)
    expect(rows.locator(".actor")).to_have_text(["alice", "alice"])
    expect(rows.locator(".target")).to_have_text([run.state.run_id] * 2)


def test_an_operator_sees_no_admin_actions_and_the_server_refuses_them_anyway(
    setup: Setup, page: Page
) -> None:
    stored = setup.admin.PutPolicy(
        pb.PutPolicyRequest(yaml=EAGER_YAML), metadata=setup.as_("root")
    ).policy
    active_before = setup.admin.GetPolicy(pb.GetPolicyRequest(), metadata=setup.as_("root"))
    sign_in(page, setup.console, setup.tokens["alice"], "alice", "/policies")

    expect(page.locator(f'#policies tr[data-version="{stored.version}"]')).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("Activate"))).to_have_count(0)
    expect(page.locator("#pin-form")).to_have_count(0)
    page.goto(setup.console.url + "/experiments")
    expect(page.locator("#start-experiment")).to_have_count(0)

    # Posted anyway, with the session's own CSRF token, as a crafted form would.
    page.evaluate(
        """(version) => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = "/actions/policy/activate";
            for (const [k, v] of [["csrf", document.body.dataset.csrf],
                                  ["version", version], ["confirmed", "yes"]]) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = k; input.value = v;
                form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
        }""",
        stored.version,
    )
    expect(page.locator("#server-error")).to_contain_text("PERMISSION_DENIED")
    answer = page.request.post(
        setup.console.url + "/actions/policy/activate",
        form={"version": stored.version, "confirmed": "yes"},
        headers={
            "X-CSRF-Token": page.evaluate("document.body.dataset.csrf"),
            "Accept": "application/json",
        },
    )
    assert answer.status == 403
    assert answer.json()["error"].startswith("PERMISSION_DENIED")

    active_after = setup.admin.GetPolicy(pb.GetPolicyRequest(), metadata=setup.as_("root"))
    assert active_after.version == active_before.version != stored.version


def test_an_admin_activates_pins_and_unpins_a_version_after_confirming_each(
    setup: Setup, page: Page
) -> None:
    stored = setup.admin.PutPolicy(
        pb.PutPolicyRequest(yaml=EAGER_YAML), metadata=setup.as_("root")
    ).policy
    default = setup.admin.GetPolicy(pb.GetPolicyRequest(), metadata=setup.as_("root"))
    sign_in(page, setup.console, setup.tokens["root"], "root", "/policies")
    row = page.locator(f'#policies tr[data-version="{stored.version}"]')
    row.get_by_role("button", name=f"Activate {stored.version}").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        f"Activate policy version {stored.version}"
    )
    page.get_by_role("button", name="Confirm").click()

    expect(page).to_have_url(re.compile("/policies$"))
    expect(page.locator("#flash")).to_contain_text(f"policy {stored.version} (eager) is now active")
    expect(page.locator("#active-version")).to_have_text(stored.version)
    expect(row.locator(".policy-active")).to_be_visible()
    assert (
        setup.admin.GetPolicy(pb.GetPolicyRequest(), metadata=setup.as_("root")).version
        == stored.version
    )

    # The default, pinned to one dataset's runs and unpinned again.
    pin = page.locator("#pin-form")
    pin.get_by_label("Version").select_option(default.version)
    pin.get_by_label("Dataset").fill("Liver")
    pin.get_by_role("button", name="Pin…").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        f"Pin policy version {default.version} to runs with dataset=Liver"
    )
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text(
        f"policy {default.version} (default) pinned to dataset=Liver"
    )
    expect(page.locator("#pins li")).to_have_text(
        [re.compile(f"dataset=Liver → {default.version}")]
    )
    page.get_by_role("button", name="Unpin dataset=Liver").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        "Remove the pin on runs with dataset=Liver"
    )
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text("pin on dataset=Liver removed")
    expect(page.locator("#pins li")).to_have_text([re.compile("No pins")])

    # A new version typed in is stored (not activated) and shown.
    page.get_by_label("Policy YAML").fill("name: typed\nplateau:\n  cooldown: 4\n")
    page.get_by_role("button", name="Store version").click()
    expect(page.locator("#flash")).to_contain_text("(typed) stored; not active until activated")
    expect(page.locator("#policy-yaml")).to_contain_text("cooldown: 4")
    expect(page.locator("#policy-state")).to_contain_text("Stored, not in use")


def test_an_admin_starts_an_experiment_sees_its_report_and_promotes_an_arm(
    setup: Setup, page: Page
) -> None:
    stored = setup.admin.PutPolicy(
        pb.PutPolicyRequest(yaml=EAGER_YAML), metadata=setup.as_("root")
    ).policy
    sign_in(page, setup.console, setup.tokens["root"], "root", "/experiments")
    start = page.locator("#start-experiment")
    start.get_by_label("Name", exact=True).fill("eager-vs-observe")
    start.get_by_label("Dataset").fill("Kidney")
    start.get_by_label("Arm 1 name").fill("observe")
    start.get_by_label("Arm 2 name").fill("eager")
    start.get_by_label("Arm 2 policy").select_option(stored.version)
    start.get_by_role("button", name="Start experiment…").click()
    what = page.locator("#confirm-what")
    expect(what).to_contain_text("Start experiment eager-vs-observe on runs with dataset=Kidney")
    expect(what).to_contain_text(f"eager (policy {stored.version}, share 1)")
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text("experiment eager-vs-observe started by root")

    for fold in range(4):
        run = SimulatedRun(
            f"kidney-fold{fold}", labels={"dataset": "Kidney", "fold": str(fold)}, epochs=6
        )
        setup.trainer.start(run)
        setup.trainer.train(run)
        setup.trainer.finish(run, dice=0.80 + 0.01 * fold)

    page.goto(setup.console.url + "/experiments/eager-vs-observe")
    expect(page.locator("#experiment-runs tbody tr")).to_have_count(4)
    report = page.locator("#report")
    expect(report.locator('tr[data-arm="observe"]')).to_contain_text("baseline")
    expect(report.locator('tr[data-arm="eager"]')).to_be_visible()
    screenshot(page, "experiment")

    page.locator('#arms tr[data-arm="eager"]').get_by_role(
        "button", name="Promote arm eager"
    ).click()
    expect(page.locator("#confirm-what")).to_contain_text(
        "Promote arm eager of experiment eager-vs-observe"
    )
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text(
        "arm eager of experiment eager-vs-observe promoted by root"
    )
    expect(page.locator("#promoted-arm")).to_contain_text("eager")
    assert (
        setup.admin.GetPolicy(pb.GetPolicyRequest(), metadata=setup.as_("root")).version
        == stored.version
    )
    expect(page.get_by_role("button", name=re.compile("Promote"))).to_have_count(0)

    # Another one, ended without promoting anything.
    setup.admin.StartExperiment(
        pb.StartExperimentRequest(
            name="second-look",
            selector=pb.RunSelector(dataset="Kidney"),
            arms=[
                pb.ExperimentArm(name="observe", observe_only=True, share=1),
                pb.ExperimentArm(name="eager", policy_version=stored.version, share=1),
            ],
        ),
        metadata=setup.as_("root"),
    )
    page.goto(setup.console.url + "/experiments")
    expect(page.locator('#experiments tr[data-experiment="eager-vs-observe"]')).to_contain_text(
        "ended"
    )
    page.get_by_role("link", name="second-look").click()
    page.get_by_label("Reason").fill("enough")
    page.get_by_role("button", name="End experiment…").click()
    expect(page.locator("#confirm-what")).to_contain_text(
        "End experiment second-look without promoting any arm"
    )
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#flash")).to_contain_text("experiment second-look ended by root")
    expect(page.locator("#experiment-status")).to_contain_text("ended")


def test_loss_weights_and_lr_as_typed_become_the_request_or_a_message_naming_the_field() -> None:
    assert parse_weights("dice=0.6, focal=0.4") == {"dice": 0.6, "focal": 0.4}
    assert parse_weights(" dice = 0.5 focal=0.5 ") == {"dice": 0.5, "focal": 0.5}
    assert parse_weights("") == {}
    assert parse_lr("") is None and parse_lr("2e-2") == 0.02
    with pytest.raises(FormError, match=r"name=value pairs .* but got 'dice'"):
        parse_weights("dice")
    with pytest.raises(FormError, match="weight of focal must be a number, but got 'x'"):
        parse_weights("dice=1 focal=x")
    with pytest.raises(FormError, match="LR must be a positive number, but got '-1'"):
        parse_lr("-1")
    with pytest.raises(FormError, match=r"LR must be a number such as 0\.02, but got 'fast'"):
        parse_lr("fast")
