//! Which requests the proxy intercepts.
//!
//! Matched on the literal path, as the homeservers route them (DESIGN.md §2 "Logout and
//! devices": Conduit and Synapse match strictly: no trailing slash, no decoding of `%6C`, no
//! `//`). Percent-decoding applies only inside path parameters (`/devices/%44H` is device `DH`).

use percent_encoding::percent_decode_str;

/// The class of a request, for routing and for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Login,
    Register,
    Refresh,
    Logout,
    LogoutAll,
    /// `DELETE /devices/{id}` with the decoded id.
    DeleteDevice(String),
    DeleteDevices,
    ChangePassword,
    Deactivate,
    Passthrough,
}

impl Route {
    /// A short name for logs and metrics (never the raw path).
    pub fn name(&self) -> &'static str {
        match self {
            Route::Login => "login",
            Route::Register => "register",
            Route::Refresh => "refresh",
            Route::Logout | Route::LogoutAll => "logout",
            Route::DeleteDevice(_) | Route::DeleteDevices => "devices",
            Route::ChangePassword | Route::Deactivate => "account",
            Route::Passthrough => "passthrough",
        }
    }
}

const CLIENT: &str = "/_matrix/client/";

/// Versions under which the login/register endpoints exist (spec, plus legacy spellings).
const LOGIN_VERSIONS: &[&str] = &["v3", "r0", "api/v1", "unstable"];
/// `/refresh` was introduced under v1 by MSC2918 and moved to v3 (spec v1.3).
const REFRESH_VERSIONS: &[&str] = &["v3", "r0", "v1", "unstable", "unstable/org.matrix.msc2918"];
/// Session-ending endpoints: every spelling a homeserver may route. Being wide costs nothing,
/// since purges happen only after the homeserver's 200.
const ACCOUNT_VERSIONS: &[&str] = &["v3", "r0", "api/v1", "unstable"];

/// Splits `/_matrix/client/<version>/<rest>` for one of `versions`; returns `rest`.
fn under<'a>(path: &'a str, versions: &[&str]) -> Option<&'a str> {
    let after = path.strip_prefix(CLIENT)?;
    versions
        .iter()
        // Longest first, so "unstable/org.matrix.msc2918" wins over "unstable".
        .filter_map(|v| after.strip_prefix(v)?.strip_prefix('/'))
        .min_by_key(|rest| rest.len())
}

/// The class of `method` (as sent, e.g. `"POST"`) on `path` (without the query).
pub fn classify(method: &str, path: &str) -> Route {
    if under(path, REFRESH_VERSIONS) == Some("refresh") {
        return Route::Refresh;
    }
    match under(path, LOGIN_VERSIONS) {
        Some("login") => return Route::Login,
        Some("register") => return Route::Register,
        _ => {}
    }
    let Some(rest) = under(path, ACCOUNT_VERSIONS) else {
        return Route::Passthrough;
    };
    match (method, rest) {
        ("POST", "logout") => Route::Logout,
        ("POST", "logout/all") => Route::LogoutAll,
        ("POST", "delete_devices") => Route::DeleteDevices,
        ("POST", "account/password") => Route::ChangePassword,
        ("POST", "account/deactivate") => Route::Deactivate,
        ("DELETE", r) => match r.strip_prefix("devices/") {
            Some(id) if !id.is_empty() && !id.contains('/') => {
                match percent_decode_str(id).decode_utf8() {
                    Ok(d) => Route::DeleteDevice(d.into_owned()),
                    Err(_) => Route::Passthrough,
                }
            }
            _ => Route::Passthrough,
        },
        _ => Route::Passthrough,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        use Route::*;
        let post = "POST";
        let rows: &[(&str, &str, Route)] = &[
            (post, "/_matrix/client/v3/login", Login),
            (post, "/_matrix/client/r0/login", Login),
            (post, "/_matrix/client/api/v1/login", Login),
            (post, "/_matrix/client/unstable/login", Login),
            ("GET", "/_matrix/client/v3/login", Login),
            (post, "/_matrix/client/v3/register", Register),
            (post, "/_matrix/client/r0/register", Register),
            (post, "/_matrix/client/v3/register/available", Passthrough),
            (post, "/_matrix/client/v3/login/", Passthrough),
            (post, "/_matrix/client/v3/login/get_token", Passthrough),
            (post, "/_matrix/client/v4/login", Passthrough),
            (post, "/_matrix/client/v3/refresh", Refresh),
            (post, "/_matrix/client/r0/refresh", Refresh),
            (post, "/_matrix/client/v1/refresh", Refresh),
            (post, "/_matrix/client/unstable/refresh", Refresh),
            (
                post,
                "/_matrix/client/unstable/org.matrix.msc2918/refresh",
                Refresh,
            ),
            ("GET", "/_matrix/client/v3/refresh", Refresh),
            (post, "/_matrix/client/v3/refresh/", Passthrough),
            (post, "/_matrix/client/v3//refresh", Passthrough),
            (post, "/_matrix/client/v3/re%66resh", Passthrough),
            (post, "/_matrix/client/v3/logout", Logout),
            (post, "/_matrix/client/r0/logout", Logout),
            ("GET", "/_matrix/client/v3/logout", Passthrough),
            (post, "/_matrix/client/v3/logout/all", LogoutAll),
            (post, "/_matrix/client/v3/logout/", Passthrough),
            (post, "/_matrix/client/v3/delete_devices", DeleteDevices),
            (
                "DELETE",
                "/_matrix/client/v3/devices/ABC",
                DeleteDevice("ABC".into()),
            ),
            (
                "DELETE",
                "/_matrix/client/r0/devices/%44H",
                DeleteDevice("DH".into()),
            ),
            (
                "DELETE",
                "/_matrix/client/v3/devices/a%2Fb",
                DeleteDevice("a/b".into()),
            ),
            ("DELETE", "/_matrix/client/v3/devices/", Passthrough),
            ("DELETE", "/_matrix/client/v3/devices/a/b", Passthrough),
            ("GET", "/_matrix/client/v3/devices/ABC", Passthrough),
            (post, "/_matrix/client/v3/account/password", ChangePassword),
            (post, "/_matrix/client/v3/account/deactivate", Deactivate),
            (post, "/_matrix/client/v3/account/whoami", Passthrough),
            ("GET", "/_matrix/client/v3/sync", Passthrough),
            (post, "/login", Passthrough),
        ];
        for (m, p, want) in rows {
            assert_eq!(&classify(m, p), want, "{m} {p}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn method() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("GET"),
            Just("POST"),
            Just("PUT"),
            Just("DELETE"),
            Just("OPTIONS"),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_paths_never_panic(m in method(), p in any::<String>()) {
            let _ = classify(m, &p);
        }

        /// Anything appended to an intercepted path makes it a different path, which the
        /// homeserver would not route to that handler either: not intercepted.
        #[test]
        fn suffixes_are_not_intercepted(
            ver in prop_oneof![Just("v3"), Just("r0"), Just("unstable"), Just("api/v1")],
            ep in prop_oneof![Just("login"), Just("register"), Just("refresh"), Just("logout"), Just("logout/all")],
            suffix in "[/%a-zA-Z0-9.]{1,8}",
        ) {
            prop_assume!(!(ep == "logout" && suffix == "/all"));
            let p = format!("/_matrix/client/{ver}/{ep}{suffix}");
            prop_assert_eq!(classify("POST", &p), Route::Passthrough, "{}", p);
        }

        /// Device ids round-trip through percent-encoding.
        #[test]
        fn device_ids_are_decoded(id in "[^/]{1,20}") {
            let enc = percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC).to_string();
            let p = format!("/_matrix/client/v3/devices/{enc}");
            prop_assert_eq!(classify("DELETE", &p), Route::DeleteDevice(id));
        }
    }
}
