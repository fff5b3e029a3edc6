import pytest
from pydantic import ValidationError

from rollout.errors import describe_validation_error
from rollout.policy import Mode, RolloutPolicy


@pytest.mark.parametrize(
    "fields,mode",
    [
        ({"max_surge_percent": 25}, Mode.SURGE),
        ({"max_unavailable_percent": 50}, Mode.UNAVAILABLE),
        ({"max_surge_percent": 1, "stabilization_time_seconds": 3600}, Mode.SURGE),
    ],
)
def test_valid_policies(fields, mode):
    assert RolloutPolicy(**fields).mode is mode


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"max_surge_percent": 51}, "max_surge_percent: Input should be less than or equal to 50"),
        ({"max_unavailable_percent": -1}, "max_unavailable_percent: Input should be greater"),
        ({"max_surge_percent": 10, "max_unavailable_percent": 10}, "exactly one of"),
        ({}, "exactly one of max_surge_percent and max_unavailable_percent"),
        (
            {"max_surge_percent": 10, "stabilization_time_seconds": 3601},
            "stabilization_time_seconds: Input should be less than or equal to 3600",
        ),
        ({"max_surge_percent": 10, "surge": 3}, "unknown field 'surge'"),
    ],
)
def test_invalid_policies_give_one_sentence_naming_the_field(fields, message):
    with pytest.raises(ValidationError) as err:
        RolloutPolicy(**fields)
    line = describe_validation_error(err.value)
    assert message in line
    assert "\n" not in line


@pytest.mark.parametrize(
    "flag,field,value",
    [("surge=25", "max_surge_percent", 25), ("unavailable=10", "max_unavailable_percent", 10)],
)
def test_parse_flag(flag, field, value):
    p = RolloutPolicy.parse_flag(flag, stabilization_time_seconds=30)
    assert getattr(p, field) == value
    assert p.stabilization_time_seconds == 30


@pytest.mark.parametrize("flag", ["surge", "surge=x", "both=3", "=5", "surge=-5"])
def test_parse_flag_rejects_garbage(flag):
    with pytest.raises(ValueError, match="--policy must look like"):
        RolloutPolicy.parse_flag(flag)
