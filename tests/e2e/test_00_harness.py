"""Checks of the harness itself, directly against Synapse (no proxy): if these fail, the
scenarios' premises are wrong, not the proxy."""

from e2e_helpers import (CS, assert_ok, assert_unknown_token, device_path, login, register,
                         uia_request)


def test_synapse_issues_no_refresh_tokens(synapse):
    """The upstream behaves like a homeserver without refresh-token support."""
    s = register(synapse.api, refresh=True)
    assert s.refresh_token is None and s.expires_in_ms is None, s.raw.keys()
    assert s.access_token.startswith("syt_")
    s2 = login(synapse.api, s.user_id, refresh=True)
    assert s2.refresh_token is None and s2.expires_in_ms is None, s2.raw.keys()


def test_synapse_uia_device_deletion_and_admin_api(synapse):
    api = synapse.api
    a = register(api, refresh=None)
    b = login(api, a.user_id, refresh=None)
    c = login(api, a.user_id, refresh=None)
    assert_ok(uia_request(api, "DELETE", device_path(b.device_id), a.access_token, {}, a.user_id))
    assert_unknown_token(api.whoami(b.access_token), soft_logout=False)
    # the admin API the revocation scenario uses
    r = api.delete(f"/_synapse/admin/v2/users/{c.user_id}/devices/{c.device_id}", synapse.admin_token)
    assert_ok(r)
    assert_unknown_token(api.whoami(c.access_token), soft_logout=False)
    assert_ok(api.whoami(a.access_token))
    devices = assert_ok(api.get(f"{CS}/devices", a.access_token))["devices"]
    assert [d["device_id"] for d in devices] == [a.device_id]
