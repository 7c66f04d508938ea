"""The Received/Date header's date is made once a second and is what
email.utils.format_datetime gives for that second."""
import datetime
import email.utils

from mailsys import receive


def test_the_date_is_the_seconds_rfc5322_date_and_changes_with_the_second():
    clock = [1764289525.25]
    now = lambda: clock[0]
    first = receive._now_rfc5322(now)
    assert first == "Fri, 28 Nov 2025 00:25:25 +0000"
    assert first == email.utils.format_datetime(datetime.datetime(2025, 11, 28, 0, 25, 25,
                                                                  tzinfo=datetime.timezone.utc))
    clock[0] = 1764289525.99
    assert receive._now_rfc5322(now) is first        # same second: the same text, not remade
    clock[0] = 1764289526.0
    assert receive._now_rfc5322(now) == "Fri, 28 Nov 2025 00:25:26 +0000"
    clock[0] = 1764289525.5                          # the clock went back: still right
    assert receive._now_rfc5322(now) == first
