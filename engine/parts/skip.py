"""The skip policy of one stream (`skip_policy`, `SkipSettings`) as a part: its caches follow the stream's frames."""

from __future__ import annotations

from ..config import StreamConfig
from ..models import ModelBundle
from ..skip import SkipPolicy, check_skip_policy, make_skip_policy, update_skip_policy


class SkipPart:
    """Holds the stream's `SkipPolicy` (None with `skip_policy="off"`, so the UNet runs exactly as without one)."""

    def __init__(self, models: ModelBundle, config: StreamConfig, runner):
        self.models = models
        self.policy: SkipPolicy | None = make_skip_policy(models, config, runner)

    def check(self, config: StreamConfig, runner) -> None:
        check_skip_policy(config, runner)

    def update(self, old: StreamConfig, new: StreamConfig, runner, fresh: bool) -> None:
        self.policy = update_skip_policy(self.policy, self.models, old, new, runner, fresh)

    def primed(self, config: StreamConfig) -> None:
        self.reset()  # priming rows hold the empty buffer's garbage: no real frame may reuse features of them

    def reset(self) -> None:
        if self.policy is not None:
            self.policy.reset()
