//! `/login` and `/register` (spec "Login", "Account registration", "Refreshing access tokens";
//! DESIGN.md §2): the refresh flag the proxy takes out of the request, and the homeserver's 200
//! it wraps into a proxy access/refresh pair.

use serde_json::{Map, Value};

use super::string;

pub const STABLE_FLAG: &str = "refresh_token";
pub const UNSTABLE_FLAG: &str = "org.matrix.msc2918.refresh_token";

/// A refresh flag that is not a boolean: a client error, and nothing is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refresh_token must be a boolean")]
pub struct FlagNotBoolean;

/// Reads and strips the refresh flags: (whether one was present, whether a refresh token is
/// wanted). Stable wins over unstable when both are present.
pub fn take_flags(obj: &mut Map<String, Value>) -> Result<(bool, bool), FlagNotBoolean> {
    let mut present = false;
    let mut want = None;
    for key in [STABLE_FLAG, UNSTABLE_FLAG] {
        match obj.remove(key) {
            None => {}
            Some(Value::Bool(b)) => {
                present = true;
                want.get_or_insert(b);
            }
            Some(_) => return Err(FlagNotBoolean),
        }
    }
    Ok((present, want.unwrap_or(false)))
}

/// `/register?kind=guest`: guests never get a refresh token.
pub fn is_guest(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "kind" && v == "guest")
    })
}

/// What a login or registration request asked of the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginAsk {
    /// A proxy refresh token (the flag, and neither a guest nor `inhibit_login`).
    pub refresh: bool,
    /// A `device_id` named by the client: its earlier sessions end on success (spec
    /// "Relationship between access tokens and devices").
    pub device_id: Option<String>,
}

impl LoginAsk {
    /// Whether the homeserver's 200 must be read at all.
    pub fn needs_answer(&self) -> bool {
        self.refresh || self.device_id.is_some()
    }
}

/// Reads a `POST /login` or `/register` body: what it asks, and the body to forward instead
/// when flags were stripped (`None`: forward it as received). A body that is not a JSON object
/// is not ours to judge: it asks nothing, and the homeserver answers it.
pub fn read_request(
    body: &[u8],
    guest: bool,
) -> Result<(LoginAsk, Option<Vec<u8>>), FlagNotBoolean> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return Ok((LoginAsk::default(), None));
    };
    let (present, want) = take_flags(&mut obj)?;
    let inhibit = obj.get("inhibit_login") == Some(&Value::Bool(true));
    let ask = LoginAsk {
        // Guests and inhibit_login never get a refresh token (the flag is still ours to strip).
        refresh: want && !inhibit && !guest,
        device_id: string(&obj, "device_id"),
    };
    let rewritten = present.then(|| serde_json::to_vec(&obj).unwrap_or_default());
    Ok((ask, rewritten))
}

/// A homeserver's 200 to a login or registration, as far as the proxy reads it.
pub struct LoginAnswer {
    obj: Map<String, Value>,
    pub user_id: Option<String>,
    pub device_id: Option<String>,
}

/// What becomes of a login answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Wrap {
    /// A proxy session for this upstream token, user and device; the answer carries its pair.
    Mint {
        upstream_token: String,
        user_id: String,
        device_id: String,
    },
    /// A refresh token was asked for, but the answer names no user or device: the homeserver's
    /// own token passes through.
    MissingIds,
    /// Passed on as it is (nothing asked, or the homeserver issued its own refresh token).
    Untouched,
}

impl LoginAnswer {
    /// `None` when the body is not a JSON object.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
            return None;
        };
        Some(LoginAnswer {
            user_id: string(&obj, "user_id"),
            device_id: string(&obj, "device_id"),
            obj,
        })
    }

    /// A re-login on a device the client named: (user, device) whose earlier proxy sessions end.
    /// The homeserver handles its own tokens; no upstream /logout (DESIGN.md §2).
    pub fn relogin<'a>(&'a self, ask: &'a LoginAsk) -> Option<(&'a str, &'a str)> {
        Some((self.user_id.as_deref()?, ask.device_id.as_deref()?))
    }

    pub fn wrap(&self, ask: &LoginAsk) -> Wrap {
        let has_own_refresh = self.obj.contains_key("refresh_token");
        if !ask.refresh || has_own_refresh {
            return Wrap::Untouched;
        }
        let Some(upstream_token) = string(&self.obj, "access_token") else {
            return Wrap::Untouched;
        };
        match (&self.user_id, &self.device_id) {
            (Some(u), Some(d)) => Wrap::Mint {
                upstream_token,
                user_id: u.clone(),
                device_id: d.clone(),
            },
            _ => Wrap::MissingIds,
        }
    }

    /// The answer with the proxy's pair in place of the homeserver's token.
    pub fn with_pair(
        mut self,
        access_token: &str,
        refresh_token: &str,
        expires_in_ms: u64,
    ) -> Vec<u8> {
        super::insert_pair(&mut self.obj, access_token, refresh_token, expires_in_ms);
        serde_json::to_vec(&self.obj).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flags(v: Value) -> Result<(bool, bool, Value), FlagNotBoolean> {
        let Value::Object(mut m) = v else {
            unreachable!()
        };
        let (p, w) = take_flags(&mut m)?;
        Ok((p, w, Value::Object(m)))
    }

    #[test]
    fn flag_rules() {
        assert_eq!(
            flags(json!({"a": 1})).unwrap(),
            (false, false, json!({"a": 1}))
        );
        assert_eq!(
            flags(json!({"refresh_token": true, "a": 1})).unwrap(),
            (true, true, json!({"a": 1}))
        );
        assert_eq!(
            flags(json!({UNSTABLE_FLAG: true})).unwrap(),
            (true, true, json!({}))
        );
        // Stable wins.
        assert_eq!(
            flags(json!({"refresh_token": false, UNSTABLE_FLAG: true})).unwrap(),
            (true, false, json!({}))
        );
        assert_eq!(
            flags(json!({"refresh_token": true, UNSTABLE_FLAG: false})).unwrap(),
            (true, true, json!({}))
        );
        assert!(flags(json!({"refresh_token": "yes"})).is_err());
        assert!(flags(json!({UNSTABLE_FLAG: 1})).is_err());
        assert!(flags(json!({"refresh_token": null})).is_err());
    }

    #[test]
    fn guest_detection() {
        assert!(is_guest(Some("kind=guest")));
        assert!(is_guest(Some("a=b&kind=guest")));
        assert!(!is_guest(Some("kind=user")));
        assert!(!is_guest(None));
    }

    fn ask(body: Value, guest: bool) -> (LoginAsk, Option<Value>) {
        let (a, rewritten) = read_request(body.to_string().as_bytes(), guest).unwrap();
        (a, rewritten.map(|b| serde_json::from_slice(&b).unwrap()))
    }

    #[test]
    fn requests() {
        let want = |refresh, device: Option<&str>| LoginAsk {
            refresh,
            device_id: device.map(str::to_owned),
        };
        assert_eq!(
            ask(
                json!({"type": "m.login.password", "refresh_token": true}),
                false
            ),
            (want(true, None), Some(json!({"type": "m.login.password"})))
        );
        // No flag: forwarded as received.
        assert_eq!(
            ask(json!({"device_id": "D"}), false),
            (want(false, Some("D")), None)
        );
        // Guests and inhibit_login: the flag is stripped, no refresh token.
        assert_eq!(
            ask(json!({"refresh_token": true}), true),
            (want(false, None), Some(json!({})))
        );
        assert_eq!(
            ask(json!({"refresh_token": true, "inhibit_login": true}), false),
            (want(false, None), Some(json!({"inhibit_login": true})))
        );
        assert!(!want(false, None).needs_answer());
        assert!(want(false, Some("D")).needs_answer());
        // Not an object: nothing asked, nothing rewritten.
        assert_eq!(
            read_request(b"not json", false).unwrap(),
            (LoginAsk::default(), None)
        );
        assert_eq!(
            read_request(b"[true]", false).unwrap(),
            (LoginAsk::default(), None)
        );
        assert_eq!(
            read_request(br#"{"refresh_token": 1}"#, false),
            Err(FlagNotBoolean)
        );
    }

    #[test]
    fn answers() {
        let refresh = LoginAsk {
            refresh: true,
            device_id: Some("D".into()),
        };
        let a = LoginAnswer::parse(
            br#"{"user_id": "@a:hs", "device_id": "D", "access_token": "up", "x": 1}"#,
        )
        .unwrap();
        assert_eq!(a.relogin(&refresh), Some(("@a:hs", "D")));
        assert_eq!(
            a.wrap(&refresh),
            Wrap::Mint {
                upstream_token: "up".into(),
                user_id: "@a:hs".into(),
                device_id: "D".into()
            }
        );
        assert_eq!(a.wrap(&LoginAsk::default()), Wrap::Untouched);
        let out: Value = serde_json::from_slice(&a.with_pair("mrpat_a", "mrprt_r", 5)).unwrap();
        assert_eq!(
            out,
            json!({"user_id": "@a:hs", "device_id": "D", "access_token": "mrpat_a",
                   "refresh_token": "mrprt_r", "expires_in_ms": 5, "x": 1})
        );
        // The homeserver's own refresh token: left alone.
        let own = LoginAnswer::parse(
            br#"{"user_id": "@a:hs", "device_id": "D", "access_token": "up", "refresh_token": "r"}"#,
        )
        .unwrap();
        assert_eq!(own.wrap(&refresh), Wrap::Untouched);
        let no_ids = LoginAnswer::parse(br#"{"access_token": "up"}"#).unwrap();
        assert_eq!(no_ids.wrap(&refresh), Wrap::MissingIds);
        assert_eq!(no_ids.relogin(&refresh), None);
        let no_token = LoginAnswer::parse(br#"{"user_id": "@a:hs", "device_id": "D"}"#).unwrap();
        assert_eq!(no_token.wrap(&refresh), Wrap::Untouched);
        assert!(LoginAnswer::parse(b"[]").is_none());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,10}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just(STABLE_FLAG.to_owned()),
                        Just(UNSTABLE_FLAG.to_owned()),
                        ".{0,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Interception never panics, removes exactly the two flags, and keeps the rest.
        #[test]
        fn flags_are_stripped_and_nothing_else_changes(v in json()) {
            let Value::Object(original) = v else { return Ok(()) };
            let mut obj = original.clone();
            match take_flags(&mut obj) {
                Ok((present, _)) => {
                    prop_assert!(!obj.contains_key(STABLE_FLAG) && !obj.contains_key(UNSTABLE_FLAG));
                    prop_assert_eq!(present, original.contains_key(STABLE_FLAG) || original.contains_key(UNSTABLE_FLAG));
                    let mut rest = original.clone();
                    rest.remove(STABLE_FLAG);
                    rest.remove(UNSTABLE_FLAG);
                    prop_assert_eq!(obj, rest);
                }
                Err(_) => {
                    let bad = |k: &str| original.get(k).is_some_and(|v| !v.is_boolean());
                    prop_assert!(bad(STABLE_FLAG) || bad(UNSTABLE_FLAG));
                }
            }
        }
    }
}
