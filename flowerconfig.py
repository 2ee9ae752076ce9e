"""Flower's settings (Flower reads ./flowerconfig.py on start): never without a login.

The login comes from FLOWER_BASIC_AUTH in the environment, never from the command line (where
`ps` would show it); an empty value would give an open dashboard that can also revoke and kill
tasks, so Flower refuses to start instead.
"""
import sys

from config import ConfigError, load_settings

try:
    _credentials = load_settings().flower_basic_auth
except ConfigError as error:
    sys.exit(str(error))
if not _credentials:
    sys.exit("FLOWER_BASIC_AUTH must be set to user:password before Flower starts (it is empty)")

basic_auth = [_credentials]

# Flower serves its Prometheus /metrics without asking for the login (its handler skips the
# check every other page makes): require it there too. /healthcheck stays open for probes.
from flower.views.monitor import Metrics  # noqa: E402
from tornado.web import authenticated  # noqa: E402

Metrics.get = authenticated(Metrics.get)

# Flower keeps task events in memory; without a bound it grows with every attempt ever made.
max_tasks = 10000
