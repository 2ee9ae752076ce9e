"""Which webhook URLs and addresses renderq may POST to, and the settings that widen it."""
from __future__ import annotations

import ipaddress

import pytest

from config import ConfigError, load_settings
from renderq.webhook_http import UnsafeUrl, check_url, refusal

LOOPBACK_AND_PRIVATE = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"),
                        ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook", "file:///etc/passwd", "http:///no-host", "javascript:alert(1)", "http://host:99999/",
    "http://93.184.216.34/a b", "http://93.184.216.34/a\r\nX-Injected: 1",
    "http://169.254.169.254/latest/meta-data", "http://metadata.google.internal/", "http://[fe80::1]/hook",
    "http://0.0.0.0/hook", "http://224.0.0.1/hook", "http://[fd00:ec2::254]/", "http://100.100.100.200/",
    "http://no-such-host.invalid/hook",
    # loopback and private, which need the allow-list
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://2130706433/hook", "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook", "http://10.0.0.5/hook", "http://172.16.3.4/hook", "http://192.168.1.1/hook",
    "http://[fd12:3456::1]/hook", "http://100.64.0.1/hook", "http://198.18.0.1/hook", "http://[2002:7f00:1::]/hook",
    "http://240.0.0.1/hook", "http://255.255.255.255/hook",
])
def test_unsafe_urls_are_refused(url):
    with pytest.raises(UnsafeUrl):
        check_url(url)


@pytest.mark.parametrize("url", ["https://93.184.216.34/hooks/renderq", "http://93.184.216.34:8080/x",
                                 "http://[2606:2800:220:1:248:1893:25c8:1946]/x"])
def test_public_addresses_are_allowed(url):
    assert check_url(url) == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.9.8.7/hook",
                                 "http://[::1]:9000/hook", "http://[::ffff:127.0.0.1]/hook"])
def test_the_allow_list_opens_what_it_names(url):
    assert check_url(url, LOOPBACK_AND_PRIVATE) == url


@pytest.mark.parametrize("url", ["http://192.168.1.1/hook", "http://172.16.0.1/hook", "http://[fe80::1]/hook"])
def test_the_allow_list_opens_nothing_else(url):
    with pytest.raises(UnsafeUrl):
        check_url(url, LOOPBACK_AND_PRIVATE)


@pytest.mark.parametrize("address, network", [("169.254.169.254", "169.254.0.0/16"), ("fd00:ec2::254", "fd00::/8"),
                                              ("100.100.100.200", "100.64.0.0/10")])
def test_metadata_addresses_stay_refused_even_when_allow_listed(address, network):
    assert refusal(ipaddress.ip_address(address), [ipaddress.ip_network(network)]) == "a cloud metadata address"


def test_the_refusal_says_which_address_and_why():
    with pytest.raises(UnsafeUrl, match=r"host localhost resolves to (127\.0\.0\.1|::1), a loopback address"):
        check_url("http://localhost:8080/hook")
    with pytest.raises(UnsafeUrl, match=r"address 10\.0\.0\.5, a private address"):
        check_url("http://10.0.0.5/hook")


def test_the_settings_default_to_no_allow_list_and_eight_attempts():
    defaults = load_settings({})
    assert defaults.webhook_allowed_networks == ()
    assert defaults.webhook_retry_delays == (1, 2, 4, 8, 16, 32, 64)


def test_the_allow_list_setting_reads_comma_separated_cidrs():
    settings = load_settings({"WEBHOOK_ALLOWED_NETWORKS": " 127.0.0.0/8, fd00::/8 ,10.1.2.3"})
    assert [str(network) for network in settings.webhook_allowed_networks] == ["127.0.0.0/8", "fd00::/8", "10.1.2.3/32"]


@pytest.mark.parametrize("name, value", [
    ("WEBHOOK_ALLOWED_NETWORKS", "localhost"), ("WEBHOOK_ALLOWED_NETWORKS", "127.0.0.1/8"),
    ("WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/33"), ("WEBHOOK_RETRY_DELAYS", "1,-2"), ("WEBHOOK_RETRY_DELAYS", "soon"),
])
def test_a_bad_webhook_setting_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})
