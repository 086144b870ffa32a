"""Defense options are checked by type and size before anything is built: the error names the option."""

import pytest

from veil.defenses import create_defense


@pytest.mark.parametrize(
    "name, options, words",
    [
        ("scnl", {"hard_fraction": "abc"}, "option hard_fraction of defense 'scnl' must be a finite number"),
        ("scnl", {"out_channels": 1.5}, "option out_channels of defense 'scnl' must be an integer"),
        ("scnl", {"sharpen": 1}, "option sharpen of defense 'scnl' must be true/false"),
        ("scnl", {"lambda_": float("nan")}, "must be a finite number"),
        ("gaussian", {"sigma": float("inf")}, "must be a finite number"),
        ("scnl", {"selector_width": 100000}, "parameters"),
        ("shredder", {"num_tensors": 10**8}, "does not fit in memory|parameters"),
    ],
)
def test_bad_option_values_are_named(name, options, words):
    with pytest.raises(ValueError, match=words):
        create_defense(name, input_shape=(1, 28, 28), num_classes=2, **options)


def test_good_values_of_the_right_kind_pass():
    d = create_defense("scnl", input_shape=(1, 8, 8), num_classes=2, lambda_=3, hard_fraction=1, out_channels=None, sharpen=True)
    assert d.lambda_ == 3.0
