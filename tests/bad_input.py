"""The table runner shared by tests/test_errors_*.py: every bad call raises the expected exception
and its message names the offending argument."""

import pytest


def bad_input_test(cases: dict, cleanup=None):
    """A parametrized test over ``cases`` ({function name: [(call, exception, argument name), ...]}).

    ``cleanup`` (optional) runs after each call, e.g. to close figures a failed plot left open.
    """
    table = [(fn_name, i, *case) for fn_name, calls in cases.items() for i, case in enumerate(calls)]

    @pytest.mark.parametrize("fn_name, i, call, exc, arg", table, ids=[f"{t[0]}-{t[1]}" for t in table])
    def test_bad_input_raises_naming_the_argument(fn_name, i, call, exc, arg):
        try:
            with pytest.raises(exc) as info:
                call()
        finally:
            if cleanup is not None:
                cleanup()
        assert arg in str(info.value), f"{fn_name} case {i}: {info.value!s} does not name {arg!r}"

    return test_bad_input_raises_naming_the_argument
