"""A handler for the console's browser tests, loaded as ``tests.e2e.console_plugin:Probe``.

It fails (``PermanentError``, so the delivery is dead at once) for every event whose id is
a line of ``LACUNA_PROBE_FAIL_PATH``, with the event's title in the error text (hostile
titles end up in errors); otherwise it succeeds with a result holding an http link and a
storage location built from the title, as the ``storage`` handler's result does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lacuna_webhooks import Event, HandlerContext, PermanentError


class Probe:
    name = "probe"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.fail_path = Path(ctx.require("FAIL_PATH"))

    async def handle(self, event: Event) -> dict[str, Any]:
        data = event.payload.get("data") if isinstance(event.payload, dict) else None
        title = str(data.get("title")) if isinstance(data, dict) else "?"
        failing = self.fail_path.read_text().split() if self.fail_path.exists() else []
        if event.id in failing:
            raise PermanentError(f"refused {title}: the archive said 422")
        return {
            "location": f"s3://archive/{title}/",
            "page": f"https://files.example/tasks/{event.id}",
            "tracks": [{"id": "trk_01", "size": 1024}],
        }

    async def aclose(self) -> None:
        return None
