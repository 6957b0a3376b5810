//! Which proxy sessions end after the homeserver's 200 to a logout, a device deletion, a
//! password change or a deactivation (DESIGN.md §2 "Logout and devices"), and when a
//! homeserver's 401 means it revoked a token behind the proxy's back.

use serde_json::Value;

use super::routes::Route;

/// Why proxy sessions were purged (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurgeCause {
    Logout,
    LogoutAll,
    /// `DELETE /devices/{id}` or `POST /delete_devices`.
    DeviceDelete,
    /// `POST /account/password` with `logout_devices`.
    PasswordChange,
    Deactivate,
    /// A login naming an existing `device_id`.
    Relogin,
    /// The homeserver rejected the upstream token (revoked behind the proxy's back).
    UpstreamRevoked,
    /// Refresh token reuse detection revoked the session.
    Reuse,
    /// An operator ended it through the admin API (`DELETE /admin/v1/...`).
    Admin,
}

impl PurgeCause {
    pub const ALL: [PurgeCause; 9] = [
        PurgeCause::Logout,
        PurgeCause::LogoutAll,
        PurgeCause::DeviceDelete,
        PurgeCause::PasswordChange,
        PurgeCause::Deactivate,
        PurgeCause::Relogin,
        PurgeCause::UpstreamRevoked,
        PurgeCause::Reuse,
        PurgeCause::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PurgeCause::Logout => "logout",
            PurgeCause::LogoutAll => "logout_all",
            PurgeCause::DeviceDelete => "device_delete",
            PurgeCause::PasswordChange => "password_change",
            PurgeCause::Deactivate => "deactivate",
            PurgeCause::Relogin => "relogin",
            PurgeCause::UpstreamRevoked => "upstream_revoked",
            PurgeCause::Reuse => "reuse",
            PurgeCause::Admin => "admin",
        }
    }

    /// Why a route's purge happens (every route is named: no wildcard).
    pub fn of(route: &Route) -> Option<PurgeCause> {
        match route {
            Route::Logout => Some(PurgeCause::Logout),
            Route::LogoutAll => Some(PurgeCause::LogoutAll),
            Route::DeleteDevice(_) | Route::DeleteDevices => Some(PurgeCause::DeviceDelete),
            Route::ChangePassword => Some(PurgeCause::PasswordChange),
            Route::Deactivate => Some(PurgeCause::Deactivate),
            Route::Login | Route::Register | Route::Refresh | Route::Passthrough => None,
        }
    }
}

/// What must be purged after the homeserver's 200, decided before forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purge {
    None,
    /// The session the request was made with.
    ThisSession,
    AllOfUser,
    Devices(Vec<String>),
    AllButDevice(String),
}

impl Purge {
    /// Whether a session of the requesting user on `device` ends ([`Purge::ThisSession`] names
    /// one session, not devices).
    pub fn ends_device(&self, device: &str) -> bool {
        match self {
            Purge::AllOfUser => true,
            Purge::Devices(ds) => ds.iter().any(|d| d == device),
            Purge::AllButDevice(keep) => keep != device,
            Purge::None | Purge::ThisSession => false,
        }
    }
}

/// Routes that end sessions of a user, who must then be known before the token may die: from
/// the proxy session, or asked of the homeserver for a token the proxy did not issue.
pub fn needs_user(route: &Route) -> bool {
    matches!(
        route,
        Route::LogoutAll
            | Route::DeleteDevice(_)
            | Route::DeleteDevices
            | Route::ChangePassword
            | Route::Deactivate
    )
}

/// Routes whose body says what is purged: it is read (bounded) when the user is known; every
/// other body streams.
pub fn reads_body(route: &Route) -> bool {
    matches!(route, Route::DeleteDevices | Route::ChangePassword)
}

/// Who made a request that may end sessions.
#[derive(Clone, Copy, Debug)]
pub struct Requester<'a> {
    /// It came with a live proxy session.
    pub has_session: bool,
    pub user: Option<&'a str>,
    pub device: Option<&'a str>,
}

/// The purge of a request. `body` is the request body when [`reads_body`] and the user is
/// known; `None` otherwise.
pub fn plan(route: &Route, who: Requester<'_>, body: Option<&[u8]>) -> Purge {
    let user = who.user.is_some();
    match route {
        Route::Logout if who.has_session => Purge::ThisSession,
        Route::LogoutAll | Route::Deactivate if user => Purge::AllOfUser,
        Route::DeleteDevice(id) if user => Purge::Devices(vec![id.clone()]),
        Route::DeleteDevices if user => {
            let devices = member(body, "devices")
                .as_ref()
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            Purge::Devices(devices)
        }
        Route::ChangePassword if user => {
            // A body the proxy cannot read (serde_json refuses some JSON a homeserver takes:
            // a lone surrogate escape, a number past f64, nesting past 128) says nothing about
            // `logout_devices`: nothing is purged here, and sessions the homeserver logged out
            // go on their first use (its 401 for their upstream token).
            let Some(mut obj) = object(body) else {
                return Purge::None;
            };
            // Spec "Password management": logout_devices defaults to true; the requester's own
            // session SHOULD NOT be revoked.
            let logout = obj
                .remove("logout_devices")
                .as_ref()
                .and_then(Value::as_bool)
                .unwrap_or(true);
            match (who.device, logout) {
                (Some(d), true) => Purge::AllButDevice(d.to_owned()),
                (None, true) => Purge::AllOfUser,
                (_, false) => Purge::None,
            }
        }
        _ => Purge::None,
    }
}

/// A JSON object body (none when the body is absent, not JSON serde_json reads, or not an
/// object).
fn object(body: Option<&[u8]>) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice(body?).ok()? {
        Value::Object(obj) => Some(obj),
        _ => None,
    }
}

/// A member of a JSON object body (none when the body is absent or not such an object).
fn member(body: Option<&[u8]>, key: &str) -> Option<Value> {
    object(body)?.remove(key)
}

/// A homeserver's 401 body: `M_UNKNOWN_TOKEN` without `soft_logout: true` means the upstream
/// token was revoked there, so the proxy session behind it goes too.
pub fn upstream_revoked(body: &[u8]) -> bool {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    v.as_ref().is_some_and(|v| {
        v.get("errcode").and_then(Value::as_str) == Some("M_UNKNOWN_TOKEN")
            && v.get("soft_logout").and_then(Value::as_bool) != Some(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Requester<'static> = Requester {
        has_session: true,
        user: Some("@alice:hs"),
        device: Some("PHONE"),
    };
    const NOBODY: Requester<'static> = Requester {
        has_session: false,
        user: None,
        device: None,
    };

    #[test]
    fn plans() {
        let dev = |id: &str| Route::DeleteDevice(id.into());
        assert_eq!(plan(&Route::Logout, ALICE, None), Purge::ThisSession);
        assert_eq!(plan(&Route::Logout, NOBODY, None), Purge::None);
        assert_eq!(plan(&Route::LogoutAll, ALICE, None), Purge::AllOfUser);
        assert_eq!(plan(&Route::Deactivate, ALICE, None), Purge::AllOfUser);
        assert_eq!(plan(&Route::LogoutAll, NOBODY, None), Purge::None);
        assert_eq!(
            plan(&dev("D"), ALICE, None),
            Purge::Devices(vec!["D".into()])
        );
        assert_eq!(
            plan(
                &Route::DeleteDevices,
                ALICE,
                Some(br#"{"devices": ["A", 1, "B"], "auth": {}}"#)
            ),
            Purge::Devices(vec!["A".into(), "B".into()])
        );
        assert_eq!(
            plan(&Route::DeleteDevices, ALICE, Some(b"nope")),
            Purge::Devices(vec![])
        );
        // Password: logout_devices defaults to true; the requester's device stays.
        assert_eq!(
            plan(&Route::ChangePassword, ALICE, Some(b"{}")),
            Purge::AllButDevice("PHONE".into())
        );
        let no_device = Requester {
            device: None,
            ..ALICE
        };
        assert_eq!(
            plan(&Route::ChangePassword, no_device, Some(b"{}")),
            Purge::AllOfUser
        );
        assert_eq!(
            plan(
                &Route::ChangePassword,
                ALICE,
                Some(br#"{"logout_devices": false}"#)
            ),
            Purge::None
        );
        assert_eq!(
            plan(&Route::ChangePassword, NOBODY, Some(b"{}")),
            Purge::None
        );
        // A body serde_json cannot read (a homeserver may take it) purges nothing here: the
        // sessions a homeserver logged out go on their upstream token's first 401.
        for body in [
            &b"nope"[..],
            b"[]",
            br#"{"new_password":"p","x":"\udc00"}"#,
            br#"{"new_password":"p","x":1e400}"#,
        ] {
            assert_eq!(
                plan(&Route::ChangePassword, ALICE, Some(body)),
                Purge::None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for r in [
            Route::Login,
            Route::Register,
            Route::Refresh,
            Route::Passthrough,
        ] {
            assert_eq!(plan(&r, ALICE, None), Purge::None);
            assert_eq!(PurgeCause::of(&r), None);
        }
    }

    #[test]
    fn which_devices_end() {
        assert!(Purge::AllOfUser.ends_device("X"));
        assert!(Purge::Devices(vec!["X".into()]).ends_device("X"));
        assert!(!Purge::Devices(vec!["X".into()]).ends_device("Y"));
        assert!(Purge::AllButDevice("X".into()).ends_device("Y"));
        assert!(!Purge::AllButDevice("X".into()).ends_device("X"));
        assert!(!Purge::None.ends_device("X"));
        assert!(!Purge::ThisSession.ends_device("X"));
    }

    #[test]
    fn route_sets() {
        assert!(needs_user(&Route::LogoutAll));
        assert!(!needs_user(&Route::Logout));
        assert!(reads_body(&Route::DeleteDevices) && reads_body(&Route::ChangePassword));
        assert!(!reads_body(&Route::Deactivate));
        assert_eq!(
            PurgeCause::of(&Route::DeleteDevices),
            Some(PurgeCause::DeviceDelete)
        );
    }

    #[test]
    fn revoked_upstream() {
        assert!(upstream_revoked(br#"{"errcode": "M_UNKNOWN_TOKEN"}"#));
        assert!(upstream_revoked(
            br#"{"errcode": "M_UNKNOWN_TOKEN", "soft_logout": false}"#
        ));
        assert!(!upstream_revoked(
            br#"{"errcode": "M_UNKNOWN_TOKEN", "soft_logout": true}"#
        ));
        assert!(!upstream_revoked(br#"{"errcode": "M_FORBIDDEN"}"#));
        assert!(!upstream_revoked(b"<html>"));
    }
}
