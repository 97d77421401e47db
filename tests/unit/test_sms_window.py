"""The per-phone window the intake answers "sms" from without waiting for SQLite."""

from __future__ import annotations

from agent.sms.window import WINDOW_S, PhoneWindow


def test_a_phone_gets_limit_notices_per_window_then_is_suppressed() -> None:
    window = PhoneWindow()
    assert [window.admit("13800000001", 1000.0 + n, 2) for n in range(3)] == [True, True, False]
    assert window.admit("13800000002", 1003.0, 2)  # another phone is not held back
    # A suppressed notice is not counted: once the first leaves the window, one more fits.
    assert window.admit("13800000001", 1000.0 + WINDOW_S + 0.5, 2)
    assert not window.admit("13800000001", 1000.0 + WINDOW_S + 0.6, 2)


def test_no_limit_with_zero() -> None:
    window = PhoneWindow()
    assert all(window.admit("13800000001", 1000.0, 0) for _ in range(50))


def test_what_was_queued_before_a_restart_counts() -> None:
    window = PhoneWindow()
    window.load([("13800000001", 990.0), ("13800000001", 995.0)])
    assert not window.admit("13800000001", 1000.0, 2)
    assert window.admit("13800000001", 990.0 + WINDOW_S + 1, 2)


def test_prune_forgets_phones_with_nothing_in_the_window() -> None:
    window = PhoneWindow()
    window.admit("13800000001", 1000.0, 3)
    window.admit("13800000002", 2000.0, 3)
    window.prune(1000.0 + WINDOW_S + 1)
    assert len(window) == 1
    assert window.admit("13800000002", 2001.0, 1) is False  # still remembered
