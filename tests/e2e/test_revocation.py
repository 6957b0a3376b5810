"""Revocation behind the proxy's back: the device is deleted on Synapse directly (admin API), so
the proxy only learns of it from Synapse's 401 on the next forwarded request."""

from e2e_helpers import (assert_alive, assert_ok, assert_refresh_rejected, assert_unknown_token,
                         login, register, wait_until_expired)


def _admin_delete_device(synapse, s):
    r = synapse.api.delete(f"/_synapse/admin/v2/users/{s.user_id}/devices/{s.device_id}", synapse.admin_token)
    assert_ok(r, "admin API device deletion on Synapse")


def test_admin_device_deletion_behind_the_proxy(proxy, synapse):
    api = proxy.api
    victim = register(api, refresh=True)
    sibling = login(api, victim.user_id, refresh=True)
    assert_alive(api, victim)
    _admin_delete_device(synapse, victim)
    r = api.whoami(victim.access_token)
    assert_unknown_token(r, soft_logout=False, what="proxy AT of a device deleted upstream")
    # the proxy has purged the session: the RT is dead and the AT stays dead
    assert_refresh_rejected(api.refresh(victim.refresh_token), "refresh of a session revoked upstream")
    assert_unknown_token(api.whoami(victim.access_token), soft_logout=False, what="second use of that AT")
    assert_alive(api, sibling, "other device of the user")


def test_admin_device_deletion_noticed_after_expiry_and_refresh(proxy, synapse):
    """The client's AT expired before the upstream revocation showed: the proxy cannot know yet, so
    the refresh may succeed; the first forwarded request tells, and from then on all is dead."""
    api = proxy.api
    victim = register(api, refresh=True)
    _admin_delete_device(synapse, victim)
    wait_until_expired(victim)
    r = api.refresh(victim.refresh_token)
    if r.status_code == 200:
        victim = victim.apply_refresh(r)
        assert_unknown_token(api.whoami(victim.access_token), soft_logout=False,
                             what="fresh AT of a session revoked upstream")
    assert_refresh_rejected(api.refresh(victim.refresh_token), "refresh after the upstream 401")
    assert_unknown_token(api.whoami(victim.access_token), soft_logout=False, what="AT after the upstream 401")


def test_admin_deactivation_behind_the_proxy(proxy, synapse):
    api = proxy.api
    victim = register(api, refresh=True)
    r = synapse.api.post(f"/_synapse/admin/v1/deactivate/{victim.user_id}", synapse.admin_token,
                         json={"erase": False})
    assert_ok(r, "admin deactivation on Synapse")
    assert_unknown_token(api.whoami(victim.access_token), soft_logout=False,
                         what="proxy AT of a user deactivated upstream")
    assert_refresh_rejected(api.refresh(victim.refresh_token), "refresh after upstream deactivation")
