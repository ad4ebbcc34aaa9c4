"""Policy documents: strict validation naming the field, the shipped default, content versions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from control_server.policy import PolicyError, parse_policy, parse_policy_source, parse_policy_yaml
from control_server.policy.document import MAX_POLICY_BYTES, MAX_POLICY_DEPTH
from control_server.policy_files import default_policy, load_policy_file


def test_the_shipped_default_is_the_spec() -> None:
    doc = default_policy()
    p, i, g = doc.plateau, doc.interventions, doc.guard
    assert (p.monitor, p.mode, p.patience, p.cooldown) == ("val_loss", "min", 3, 2)
    assert (p.min_delta, p.threshold_mode, p.warmup_epochs, p.ema_alpha) == (0.01, "rel", 5, None)
    assert i.max_interventions == 3
    assert i.grad_norm_edges == (0.01, 0.1, 0.5) and i.lr_scales == (15, 10, 5, 3)
    assert i.missing_grad_norm == 0.1 and i.damping == (1.0, 0.7, 0.5) and i.max_lr is None
    assert [dict(m) for m in i.random_mixes] == [
        {"dice": 0.6, "focal": 0.4},
        {"dice": 0.5, "focal": 0.5},
        {"dice": 0.4, "focal": 0.6},
        {"dice": 0.7, "focal": 0.3},
        {"dice": 0.5, "focal": 0.3, "variance": 0.2},
    ]
    assert dict(i.final_mix) == {"dice": 0.6, "focal": 0.4}
    assert (g.guard_epochs, g.rollback_tolerance, g.on_nonfinite) == (2, 0.5, "stop")


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"plateau": {"patience": -1}}, "plateau.patience"),
        ({"plateau": {"patiense": 3}}, "plateau.patiense"),
        ({"plateau": {"patience": 2.5}}, "plateau.patience"),
        ({"plateau": {"patience": True}}, "plateau.patience"),
        ({"plateau": {"mode": "median"}}, "plateau.mode"),
        ({"plateau": {"threshold_mode": "pct"}}, "plateau.threshold_mode"),
        ({"plateau": {"ema_alpha": 0}}, "plateau.ema_alpha"),
        ({"plateau": {"ema_alpha": 1.5}}, "plateau.ema_alpha"),
        ({"plateau": {"min_delta": float("nan")}}, "plateau.min_delta"),
        ({"interventions": {"grad_norm_edges": [0.1, 0.01, 0.5]}}, "interventions.grad_norm_edges"),
        ({"interventions": {"lr_scales": [15, 10, 5]}}, "interventions.lr_scales"),
        ({"interventions": {"lr_scales": [15, 10, 0, 3]}}, "interventions.lr_scales"),
        ({"interventions": {"damping": []}}, "interventions.damping"),
        ({"interventions": {"max_lr": -0.1}}, "interventions.max_lr"),
        (
            {"interventions": {"final_mix": {"dice": 1, "tversky": 1}}},
            "interventions.final_mix.tversky",
        ),
        ({"interventions": {"final_mix": {"dice": -1}}}, "interventions.final_mix.dice"),
        ({"interventions": {"final_mix": {"dice": 0}}}, "interventions.final_mix"),
        (
            {"interventions": {"random_mixes": [{"dice": 1}, {"ce": 1, "lovasz": 2}]}},
            "interventions.random_mixes[1].lovasz",
        ),
        ({"interventions": {"stop_when_exhausted": "yes"}}, "interventions.stop_when_exhausted"),
        ({"guard": {"on_nonfinite": "explode"}}, "guard.on_nonfinite"),
        ({"guard": {"rollback_tolerance": -0.5}}, "guard.rollback_tolerance"),
        ({"colour": "blue"}, "colour"),
        ({"name": ""}, "name"),
        ({"plateau": [1, 2]}, "plateau"),
    ],
)
def test_an_invalid_document_names_the_field(document: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(document)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_invalid_yaml_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="not valid YAML"):
        parse_policy_yaml("plateau: {patience: 3\n")


def test_a_partial_document_takes_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: quick\nplateau: {patience: 1}\n")
    doc = load_policy_file(path)
    assert doc.name == "quick" and doc.plateau.patience == 1
    assert doc.plateau.cooldown == 2 and doc.interventions == default_policy().interventions


def test_versions_are_content_hashes() -> None:
    doc = default_policy()
    again = parse_policy(doc.to_mapping())
    assert again == doc and again.version == doc.version
    changed = parse_policy({**doc.to_mapping(), "plateau": {"patience": 4}})
    assert changed.version != doc.version
    # Key order and int-vs-float spelling do not make a new version.
    reordered = parse_policy_yaml(
        "plateau: {cooldown: 2, patience: 4}\nname: default\n"
        "description: Adaptive plateau intervention with a divergence "
        "guard.\n"
    )
    assert reordered.version == changed.version


#: The hostile document: 40 KB of nested flow lists (it cost 25 s of CPU, then a RecursionError).
NESTED = "name: " + "[" * 20_000 + "]" * 20_000 + "\n"


def nested_data(depth: int) -> dict[str, object]:
    data: dict[str, object] = {"name": "deep"}
    inner = data
    for _ in range(depth):
        inner["description"] = inner = {}
    return data


@pytest.mark.parametrize(
    "text",
    [
        NESTED,
        "name: " + "{a: " * 10_000 + "}" * 10_000 + "\n",
        "".join(" " * i + f"k{i}:\n" for i in range(300)),  # block mappings, 300 deep
    ],
    ids=["flow-lists", "flow-mappings", "block-mappings"],
)
def test_deep_nesting_is_refused_before_it_is_parsed(text: str) -> None:
    began = time.perf_counter()
    with pytest.raises(PolicyError) as err:
        parse_policy_source(text)
    assert time.perf_counter() - began < 0.5
    assert err.value.field == "policy"
    assert f"at most {MAX_POLICY_DEPTH} levels deep" in str(err.value)


def test_a_document_over_the_size_limit_is_refused_by_size() -> None:
    text = "description: " + "x" * MAX_POLICY_BYTES + "\n"
    with pytest.raises(PolicyError, match=f"at most {MAX_POLICY_BYTES} bytes, but got"):
        parse_policy_source(text)
    with pytest.raises(PolicyError, match=f"at most {MAX_POLICY_BYTES} bytes, but got"):
        parse_policy_source({"description": "x" * MAX_POLICY_BYTES})


def test_text_and_data_obey_the_same_depth_and_alias_rules() -> None:
    deep = nested_data(MAX_POLICY_DEPTH)
    with pytest.raises(PolicyError, match="levels deep"):
        parse_policy_source(deep)
    with pytest.raises(PolicyError, match="levels deep"):
        parse_policy_source(yaml.safe_dump(deep))
    with pytest.raises(PolicyError, match="aliases"):
        parse_policy_source("a: &x 3\nplateau: {patience: *x}\n")


def test_the_shipped_default_is_within_the_limits_in_both_forms() -> None:
    doc = default_policy()
    assert parse_policy_source(doc.to_mapping()) == doc
    assert parse_policy_source(yaml.safe_dump(doc.to_mapping())) == doc


def test_a_policy_file_with_an_alias_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "aliased.yaml"
    path.write_text("name: a\nplateau: &p {patience: 2}\nguard: {guard_epochs: 2}\nx: *p\n")
    with pytest.raises(PolicyError) as err:
        load_policy_file(path)
    assert "aliases" in str(err.value) and str(path) in str(err.value)
