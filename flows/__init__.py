"""Prefect flows and deployments: scheduling and observing the DVC pipeline, no training logic."""

import os

# Prefect reads its settings once, at import: these defaults must be set before it is imported.
# The temporary server a flow starts when no PREFECT_API_URL is set needs ~25 s on a 2-core machine
# (the default timeout is 20 s); analytics would try to reach the internet.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
