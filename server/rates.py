"""A session's message rate: what to do with each message a client sends, as a pure decision."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Admission(enum.Enum):
    """What becomes of one message."""

    ACCEPT = "accept"
    #: Over the rate: a frame is answered `dropped` at once, a control message gets a `busy` error.
    REFUSE = "refuse"
    #: Over the rate for long enough to be a flood: the connection closes (1008).
    CLOSE = "close"


@dataclass
class MessageRate:
    """A token bucket of `rate` messages a second (as many at once), and a tally of what it refused.

    Every message costs a parse, a queue and an answer on the event loop all sessions share, so a client may
    send at most `rate` a second (a camera's frames and a slider's updates fit many times over). Refused
    messages are tallied and the tally drains at half the rate: a client sending at twice the rate reaches a
    second's worth of refusals within two seconds and is closed; one briefly over it only loses messages.

    Args:
        rate (`float`): messages a second, and the burst allowed after a quiet second.
        now (`float`): the clock's current reading (seconds).
    """

    rate: float
    now: float
    tokens: float = field(init=False)
    refused: float = field(default=0.0, init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"`rate` must be positive, got {self.rate}")
        self.tokens = self.rate
        self.last = self.now

    def admit(self, now: float) -> Admission:
        """The fate of a message that arrived at `now` (a monotonic clock, in seconds)."""
        elapsed = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(self.rate, self.tokens + elapsed * self.rate)
        self.refused = max(0.0, self.refused - elapsed * self.rate / 2)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return Admission.ACCEPT
        self.refused += 1.0
        return Admission.CLOSE if self.refused > self.rate else Admission.REFUSE
