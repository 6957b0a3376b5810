"""Logout, device deletion, password change and deactivation keep the proxy's sessions in step
with Synapse: the right proxy tokens die (401 M_UNKNOWN_TOKEN soft_logout false, refresh 401),
all others live."""

from e2e_helpers import (CS, PASSWORD, assert_alive, assert_dead, assert_ok, assert_unknown_token,
                         device_path, login, register, uia_request, wait_until_expired)


def _devices(synapse, user_id):
    """The user's devices as Synapse itself sees them (admin API, straight to Synapse)."""
    r = synapse.api.get(f"/_synapse/admin/v2/users/{user_id}/devices", synapse.admin_token)
    return {d["device_id"] for d in assert_ok(r, "admin device list")["devices"]}


def _user_with_devices(api, n):
    """A new user with n proxy sessions (refresh tokens), each on its own device."""
    first = register(api, refresh=True)
    return [first] + [login(api, first.user_id, refresh=True) for _ in range(n - 1)]


def test_logout_purges_whole_session(proxy, synapse):
    api = proxy.api
    a, b = _user_with_devices(api, 2)
    bystander = register(api, refresh=True)
    # give a a chain: an older AT that is still inside its lifetime, and the current pair
    a_old_at = a.access_token
    a = a.apply_refresh(api.refresh(a.refresh_token))
    assert_alive(api, a)
    assert_ok(api.post(f"{CS}/logout", a.access_token, json={}), "logout")
    assert_dead(api, a, "logged-out session:")
    assert_unknown_token(api.whoami(a_old_at), soft_logout=False, what="older AT of the logged-out chain")
    assert_alive(api, b, "other device of the same user")
    assert_alive(api, bystander, "another user")
    assert a.device_id not in _devices(synapse, a.user_id)


def test_logout_with_expired_access_token(proxy, synapse):
    api = proxy.api
    a, b = _user_with_devices(api, 2)
    wait_until_expired(a)
    assert_ok(api.post(f"{CS}/logout", a.access_token, json={}), "logout with an expired AT")
    assert_dead(api, a, "session logged out with an expired AT:")
    assert a.device_id not in _devices(synapse, a.user_id), "Synapse did not log the device out"
    b = b.apply_refresh(api.refresh(b.refresh_token))
    assert_alive(api, b, "other device")


def test_logout_all_purges_every_session_of_the_user(proxy, synapse):
    api = proxy.api
    a, b, c = _user_with_devices(api, 3)
    plain = login(api, a.user_id, refresh=None)  # a non-refresh login of the same user
    bystander = register(api, refresh=True)
    b = b.apply_refresh(api.refresh(b.refresh_token))
    assert_ok(api.post(f"{CS}/logout/all", a.access_token, json={}), "logout/all")
    for s, what in ((a, "requester"), (b, "refreshed device"), (c, "third device")):
        assert_dead(api, s, f"after logout/all, {what}:")
    assert_unknown_token(api.whoami(plain.access_token), soft_logout=False, what="non-refresh token after logout/all")
    assert _devices(synapse, a.user_id) == set()
    assert_alive(api, bystander, "another user")


def test_delete_device_with_uia(proxy, synapse):
    api = proxy.api
    a, b, c = _user_with_devices(api, 3)
    # without auth: the UIA challenge passes through and nothing is purged
    first = api.delete(device_path(b.device_id), a.access_token, json={})
    assert first.status_code == 401 and "flows" in first.json(), f"{first.status_code}: {first.text}"
    assert_alive(api, b, "device after an unauthenticated delete attempt")
    r = uia_request(api, "DELETE", device_path(b.device_id), a.access_token, {}, a.user_id)
    assert_ok(r, "DELETE /devices/{id} with UIA")
    assert_dead(api, b, "deleted device:")
    assert_alive(api, a, "requester")
    assert_alive(api, c, "third device")
    assert _devices(synapse, a.user_id) == {a.device_id, c.device_id}


def test_delete_device_with_percent_encoded_id(proxy, synapse):
    """/devices/{id} path parameters are percent-decoded like Synapse does."""
    api = proxy.api
    a = register(api, refresh=True)
    odd = login(api, a.user_id, refresh=True, device_id="E2E dev+1")
    assert odd.device_id == "E2E dev+1"
    assert device_path(odd.device_id).endswith("/E2E%20dev%2B1")
    r = uia_request(api, "DELETE", device_path(odd.device_id), a.access_token, {}, a.user_id)
    assert_ok(r, "DELETE /devices/E2E%20dev%2B1 with UIA")
    assert _devices(synapse, a.user_id) == {a.device_id}
    assert_dead(api, odd, "device deleted by its percent-encoded id:")
    assert_alive(api, a)


def test_delete_devices_with_uia(proxy, synapse):
    api = proxy.api
    a, b, c, d = _user_with_devices(api, 4)
    r = uia_request(api, "POST", f"{CS}/delete_devices", a.access_token,
                    {"devices": [b.device_id, c.device_id]}, a.user_id)
    assert_ok(r, "POST /delete_devices with UIA")
    assert_dead(api, b, "first deleted device:")
    assert_dead(api, c, "second deleted device:")
    assert_alive(api, a, "requester")
    assert_alive(api, d, "device not in the list")
    assert _devices(synapse, a.user_id) == {a.device_id, d.device_id}


def test_password_change_with_logout_devices(proxy, synapse):
    api = proxy.api
    a, b, c = _user_with_devices(api, 3)
    bystander = register(api, refresh=True)
    r = uia_request(api, "POST", f"{CS}/account/password", a.access_token,
                    {"new_password": PASSWORD + "-new", "logout_devices": True}, a.user_id)
    assert_ok(r, "password change with logout_devices")
    assert_alive(api, a, "requester after the password change")
    a = a.apply_refresh(api.refresh(a.refresh_token))
    assert_alive(api, a, "requester after a refresh")
    assert_dead(api, b, "other device after password change:")
    assert_dead(api, c, "third device after password change:")
    assert_alive(api, bystander)
    assert _devices(synapse, a.user_id) == {a.device_id}
    # the new password logs in through the proxy
    assert_alive(api, login(api, a.user_id, password=PASSWORD + "-new", refresh=True))


def test_password_change_without_logout_devices(proxy):
    api = proxy.api
    a, b = _user_with_devices(api, 2)
    r = uia_request(api, "POST", f"{CS}/account/password", a.access_token,
                    {"new_password": PASSWORD + "-new", "logout_devices": False}, a.user_id)
    assert_ok(r, "password change, logout_devices false")
    assert_alive(api, a)
    b = b.apply_refresh(api.refresh(b.refresh_token))
    assert_alive(api, b, "other device survives logout_devices false")


def test_deactivation_purges_every_session(proxy, synapse):
    api = proxy.api
    a, b = _user_with_devices(api, 2)
    bystander = register(api, refresh=True)
    r = uia_request(api, "POST", f"{CS}/account/deactivate", a.access_token, {"erase": False}, a.user_id)
    assert_ok(r, "account deactivation")
    assert_dead(api, a, "requester after deactivation:")
    assert_dead(api, b, "other device after deactivation:")
    assert_alive(api, bystander, "another user")
    bystander = bystander.apply_refresh(api.refresh(bystander.refresh_token))
    assert_alive(api, bystander, "another user after a refresh")
