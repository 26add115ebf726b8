"""The admin API and console (SPEC §9): a Starlette app of its own, served on its own
listener (``LACUNA_ADMIN_HOST``:``LACUNA_ADMIN_PORT``), never on the webhook port.

Layout: ``app.py`` builds the app (auth, error envelope, the areas' routes); ``auth.py``
bearer tokens, the console's session cookie and CSRF tokens; ``context.py`` what every
route reads; one module per area, each exporting ``routes(ctx)`` and ``PATHS`` (its part of
the OpenAPI document): ``api_events.py`` (events, deliveries, handlers), ``api_bulk.py``
(bulk replay and backfill), ``api_live.py`` (task state and the live stream);
``openapi.py`` assembles the document; ``console/`` the HTML console; ``client.py`` the
HTTP client the CLI uses to reach a remote admin API.
"""

from .app import create_admin_app
from .context import AdminContext

__all__ = ["AdminContext", "create_admin_app"]
