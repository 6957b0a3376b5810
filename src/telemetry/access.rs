//! The one line logged per request, written without the `tracing` event machinery.
//!
//! Through `tracing::info!` the line cost about a tenth of the proxy's CPU on the access-token
//! path (issue 11; `scripts/bench.sh` with `RUST_LOG=warn` measured 11 % faster): field visitors,
//! `core::fmt` for every value, the RFC 3339 timestamp formatted from scratch each time. Here
//! the same bytes are assembled by hand into a reused buffer, the timestamp's date and time of
//! day are formatted once per second, and the line goes to the same batched stderr as every
//! other. The output is byte for byte what the `tracing-subscriber` formatter the proxy installs
//! writes for that event, text or JSON (the tests below compare the two), so log readers see no
//! difference. Used only when the proxy's own subscriber is installed without ANSI colours
//! ([`super::init`]); otherwise the caller logs through `tracing` as before.

use std::cell::RefCell;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;

/// The event's target, as `tracing` names it: the module that logs it.
pub const TARGET: &str = "matrix_refresh_proxy::server::request";

/// Set by [`super::init`] when the fast path writes what the subscriber would.
pub(super) static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The fields of a request's line (never a token, a path or a query).
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub latency_ms: u64,
    pub request_id: &'a str,
    pub user_id: Option<&'a str>,
}

thread_local! {
    static BUF: RefCell<(Vec<u8>, Clock)> = RefCell::new((Vec::with_capacity(256), Clock::default()));
}

/// Writes the line to the batched stderr. False when the fast path is not set up (no subscriber
/// of ours, or ANSI colours on): the caller then logs through `tracing`.
pub fn write(line: &AccessLine<'_>) -> bool {
    let (Some(format), Some(out)) = (FORMAT.get(), super::STDERR.get()) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    BUF.with(|b| {
        let (buf, clock) = &mut *b.borrow_mut();
        buf.clear();
        let ts = clock.stamp(now.as_secs(), now.subsec_micros());
        format_line(buf, *format, ts, line);
        let _ = out.line_writer(false).write_all(buf);
    });
    true
}

/// The line as the installed formatter writes it (`ts`: RFC 3339, µs, `Z`).
fn format_line(buf: &mut Vec<u8>, format: LogFormat, ts: &[u8], l: &AccessLine<'_>) {
    // `tracing-subscriber`'s Full format: `{ts}  INFO {target}: {message} {fields}`; its JSON
    // formatter with `flatten_event(true)`, outside any span: timestamp, level, message, the
    // fields, target.
    match format {
        LogFormat::Pretty => {
            buf.extend_from_slice(ts);
            buf.extend_from_slice(b"  INFO ");
            buf.extend_from_slice(TARGET.as_bytes());
            buf.extend_from_slice(b": request");
        }
        LogFormat::Json => {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            buf.extend_from_slice(ts);
            buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
        }
    }
    let mut f = Fields { buf, format };
    f.field("method", Value::Display(l.method));
    f.field("route", Value::Str(l.route));
    f.field("status", Value::Num(u64::from(l.status)));
    f.field("latency_ms", Value::Num(l.latency_ms));
    f.field("request_id", Value::Str(l.request_id));
    if let Some(u) = l.user_id {
        f.field("user_id", Value::Str(u));
    }
    if format == LogFormat::Json {
        buf.extend_from_slice(b",\"target\":\"");
        buf.extend_from_slice(TARGET.as_bytes());
        buf.extend_from_slice(b"\"}");
    }
    buf.push(b'\n');
}

/// A field's value, as the event records it.
enum Value<'a> {
    /// A `%`-field: Display in text, a JSON string.
    Display(&'a str),
    /// A `&str` field: Debug (quoted) in text, a JSON string.
    Str(&'a str),
    Num(u64),
}

struct Fields<'b> {
    buf: &'b mut Vec<u8>,
    format: LogFormat,
}

impl Fields<'_> {
    /// ` name=value` in text, `,"name":value` in JSON.
    fn field(&mut self, name: &str, v: Value<'_>) {
        let buf = &mut *self.buf;
        match self.format {
            LogFormat::Pretty => {
                buf.push(b' ');
                buf.extend_from_slice(name.as_bytes());
                buf.push(b'=');
            }
            LogFormat::Json => {
                buf.extend_from_slice(b",\"");
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(b"\":");
            }
        }
        match (v, self.format) {
            (Value::Num(n), _) => decimal(buf, n),
            (Value::Display(s), LogFormat::Pretty) => buf.extend_from_slice(s.as_bytes()),
            (Value::Str(s), LogFormat::Pretty) => quoted(buf, s, |b, s| {
                let _ = write!(b, "{s:?}");
            }),
            (Value::Display(s) | Value::Str(s), LogFormat::Json) => quoted(buf, s, |b, s| {
                let _ = serde_json::to_writer(b, s);
            }),
        }
    }
}

/// A quoted string: plain printable ASCII without `"` or `\` (every generated request id, route
/// name and ordinary user id) is copied as is, anything else escaped by `escape` (Rust's `{:?}`
/// or JSON's, which agree on plain ASCII).
fn quoted(buf: &mut Vec<u8>, s: &str, escape: impl FnOnce(&mut Vec<u8>, &str)) {
    // Without early exit, so the compiler checks 32 bytes at a time (the early-exit `all` took
    // about 10 instructions a byte, 580 per line).
    let plain = s.bytes().fold(true, |plain, c| {
        plain & (0x20..0x7f).contains(&c) & (c != b'"') & (c != b'\\')
    });
    if plain {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        escape(buf, s);
    }
}

fn decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// The timestamp, its `YYYY-MM-DDTHH:MM:SS` part formatted once per second.
#[derive(Default)]
struct Clock {
    secs: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`
    text: [u8; 27],
}

impl Clock {
    fn stamp(&mut self, secs: u64, micros: u32) -> &[u8] {
        if self.secs != Some(secs) {
            self.secs = Some(secs);
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let t = secs % 86_400;
            let mut w = &mut self.text[..];
            let _ = write!(
                w,
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.",
                t / 3600,
                t / 60 % 60,
                t % 60
            );
            w = &mut self.text[26..];
            let _ = w.write_all(b"Z");
        }
        let mut m = micros;
        for i in (20..26).rev() {
            self.text[i] = b'0' + (m % 10) as u8;
            m /= 10;
        }
        &self.text
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::super::Capture;
    use super::*;

    /// What `tracing-subscriber`, configured as [`super::super::init`] does, writes for the event.
    fn by_tracing(format: LogFormat, l: &AccessLine<'_>) -> String {
        let cap = Capture::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(cap.clone())
            .with_ansi(false);
        let emit = || {
            tracing::info!(
                target: TARGET,
                method = %l.method,
                route = l.route,
                status = l.status,
                latency_ms = l.latency_ms,
                request_id = l.request_id,
                user_id = l.user_id,
                "request"
            )
        };
        match format {
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), emit)
            }
            LogFormat::Pretty => tracing::subscriber::with_default(builder.finish(), emit),
        }
        String::from_utf8(cap.0.lock().unwrap().clone()).unwrap()
    }

    fn by_hand(format: LogFormat, l: &AccessLine<'_>, ts: &[u8]) -> String {
        let mut buf = Vec::new();
        format_line(&mut buf, format, ts, l);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn the_line_is_the_one_tracing_writes() {
        let lines = [
            AccessLine {
                method: "GET",
                route: "passthrough",
                status: 200,
                latency_ms: 0,
                request_id: "84c5e33250fb2e0f13fd2fc29802f1d1",
                user_id: Some("@alice:example.org"),
            },
            AccessLine {
                method: "POST",
                route: "refresh",
                status: 401,
                latency_ms: 12_345,
                request_id: "client \"id\" \\ é\u{7}",
                user_id: None,
            },
            AccessLine {
                method: "PROPFIND",
                route: "login",
                status: 503,
                latency_ms: u64::MAX,
                request_id: "x",
                user_id: Some("@\u{1F600}\"q\":hs"),
            },
        ];
        for format in [LogFormat::Pretty, LogFormat::Json] {
            for l in &lines {
                let reference = by_tracing(format, l);
                // Compare with tracing's own timestamp put into the hand-made line.
                let ts = match format {
                    LogFormat::Pretty => reference[..27].to_owned(),
                    LogFormat::Json => reference[14..41].to_owned(),
                };
                assert_eq!(by_hand(format, l, ts.as_bytes()), reference);
            }
        }
    }

    #[test]
    fn timestamps_match_rfc3339() {
        let mut c = Clock::default();
        assert_eq!(c.stamp(0, 0), b"1970-01-01T00:00:00.000000Z");
        assert_eq!(c.stamp(951_782_400, 7), b"2000-02-29T00:00:00.000007Z");
        assert_eq!(
            c.stamp(1_796_353_922, 227_251),
            b"2026-12-04T03:12:02.227251Z"
        );
        assert_eq!(
            c.stamp(1_796_353_922, 999_999),
            b"2026-12-04T03:12:02.999999Z"
        );
        assert_eq!(c.stamp(4_102_444_799, 1), b"2099-12-31T23:59:59.000001Z");
    }
}
