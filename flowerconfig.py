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
