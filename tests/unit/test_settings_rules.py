"""Settings rules and their CLI edge: flags over TICKCAST_* variables, exit status 2.

Covers the exactly-once/idempotence rule of ``daemon.settings.Settings``, the override
order of ``daemon.cli.settings_from_args`` (a flag beats the variable of the same name)
and how ``daemon.cli.main`` reports invalid settings (status 2, message on stderr).
"""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from daemon.cli import build_parser, main, settings_from_args
from daemon.settings import Settings

RULE = "TICKCAST_DELIVERY=exactly_once needs TICKCAST_ENABLE_IDEMPOTENCE=true"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TICKCAST_* variable of the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("TICKCAST_"):
            monkeypatch.delenv(name)


def settings_of(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(list(argv)))


# --------------------------------------------------------------------------- the rule


def test_exactly_once_without_idempotence_is_refused() -> None:
    with pytest.raises(ValidationError, match=RULE):
        Settings(delivery="exactly_once", enable_idempotence=False)


def test_exactly_once_without_idempotence_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TICKCAST_DELIVERY", "exactly_once")
    monkeypatch.setenv("TICKCAST_ENABLE_IDEMPOTENCE", "false")
    with pytest.raises(ValidationError, match=RULE):
        Settings()


@pytest.mark.parametrize(
    ("delivery", "idempotence"),
    [("exactly_once", True), ("at_least_once", False), ("at_least_once", True)],
)
def test_other_combinations_are_accepted(delivery: str, idempotence: bool) -> None:
    s = Settings(delivery=delivery, enable_idempotence=idempotence)
    assert (s.delivery, s.enable_idempotence) == (delivery, idempotence)


def test_the_rule_sees_a_flag_and_a_variable_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKCAST_ENABLE_IDEMPOTENCE", "false")
    with pytest.raises(ValidationError, match=RULE):
        settings_of("serve", "--delivery", "exactly_once")
    # ...and a flag can repair what the environment says.
    fixed = settings_of("serve", "--delivery", "exactly_once", "--enable-idempotence")
    assert fixed.delivery == "exactly_once" and fixed.enable_idempotence is True


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("variable", "value", "flags", "field", "expected"),
    [
        ("TICKCAST_MAX_BATCH_SIZE", "100", ["--max-batch-size", "512"], "max_batch_size", 512),
        ("TICKCAST_OUTPUT_TOPIC", "from-env", ["--output-topic", "from-flag"], "output_topic",
         "from-flag"),
        ("TICKCAST_DELIVERY", "at_least_once", ["--delivery", "exactly_once"], "delivery",
         "exactly_once"),
        ("TICKCAST_MAX_BATCH_DELAY_MS", "5", ["--max-batch-delay-ms", "0.5"], "max_batch_delay_ms",
         0.5),
        ("TICKCAST_CONFLATE", "true", ["--no-conflate"], "conflate", False),
        ("TICKCAST_CONFLATE", "false", ["--conflate"], "conflate", True),
        ("TICKCAST_BOOTSTRAP_SERVERS", "env:9092", ["--bootstrap-servers", "flag:9092"],
         "bootstrap_servers", "flag:9092"),
    ],
)  # fmt: skip
def test_a_flag_overrides_its_variable(
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    flags: list[str],
    field: str,
    expected: object,
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(settings_of("serve"), field) != expected  # the variable alone
    assert getattr(settings_of("serve", *flags), field) == expected


def test_without_a_flag_the_variable_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKCAST_MAX_BATCH_SIZE", "100")
    monkeypatch.setenv("TICKCAST_CONFLATE", "true")
    s = settings_of("serve", "--output-topic", "other")
    assert (s.max_batch_size, s.conflate, s.output_topic) == (100, True, "other")


def test_replay_flags_override_the_kafka_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKCAST_INPUT_TOPIC", "env-ticks")
    monkeypatch.setenv("TICKCAST_BOOTSTRAP_SERVERS", "env:9092")
    s = settings_of("replay", "--data", "dataset:goog", "--input-topic", "flag-ticks")
    assert (s.input_topic, s.bootstrap_servers) == ("flag-ticks", "env:9092")


def test_no_flags_no_variables_gives_the_defaults() -> None:
    assert settings_of("serve") == Settings()


# --------------------------------------------------------------------------- main


def test_main_exits_2_on_the_exactly_once_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--delivery", "exactly_once", "--no-enable-idempotence"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("tickcast serve: invalid settings:\n")
    assert RULE in captured.err
    assert captured.out == ""


def test_main_exits_2_on_an_invalid_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TICKCAST_MAX_BATCH_SIZE", "0")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tickcast serve: invalid settings:")
    assert "max_batch_size" in err and "greater than or equal to 1" in err


def test_main_exits_2_on_an_invalid_flag_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert "max_batch_size" in err and "valid integer" in err


def test_main_exits_2_on_invalid_replay_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TICKCAST_SECURITY_PROTOCOL", "CARRIER_PIGEON")
    assert main(["replay", "--data", "dataset:goog"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tickcast replay: invalid settings:")
    assert "security_protocol" in err


def test_an_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_bad_choice_of_literal_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--delivery", "at_most_once"]) == 2
    err = capsys.readouterr().err
    assert "delivery" in err and "at_least_once" in err and "exactly_once" in err
