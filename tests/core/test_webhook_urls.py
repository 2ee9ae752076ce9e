"""Which webhook URLs renderq may POST to."""
from __future__ import annotations

import pytest

from renderq.webhooks import UnsafeUrl, check_url


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook", "file:///etc/passwd", "http:///no-host", "javascript:alert(1)",
    "http://169.254.169.254/latest/meta-data", "http://metadata.google.internal/", "http://[fe80::1]/hook",
    "http://0.0.0.0/hook", "http://224.0.0.1/hook", "http://[fd00:ec2::254]/", "http://100.100.100.200/",
    "http://no-such-host.invalid/hook",
])
def test_unsafe_urls_are_refused(url):
    with pytest.raises(UnsafeUrl):
        check_url(url)


@pytest.mark.parametrize("url", ["https://93.184.216.34/hooks/renderq", "http://93.184.216.34:8080/x"])
def test_public_addresses_are_allowed(url):
    assert check_url(url) == url
