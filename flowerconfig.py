"""Flower's settings (Flower reads ./flowerconfig.py on start): never without a login.

The Procfile passes --basic-auth=${FLOWER_BASIC_AUTH}; an empty value would give an open
dashboard that can also revoke and kill tasks, so Flower refuses to start instead.
"""
import os
import sys

_credentials = os.environ.get("FLOWER_BASIC_AUTH", "")
if ":" not in _credentials or _credentials.startswith(":") or _credentials.endswith(":"):
    sys.exit("FLOWER_BASIC_AUTH must be set to user:password before Flower starts (it is %s)"
             % ("empty" if not _credentials else "not user:password"))

basic_auth = [_credentials]
