//! The request id on every line logged while a request is handled, without a `tracing` span.
//!
//! A span per request (`request{request_id=…}`) cost about 7 % of the proxy's CPU on the
//! passthrough path (issue 11: 1.4 µs of 21 µs per request, side by side with a span-less
//! build): the registry allocates its slot and formats its fields into a `String` on every
//! request, and enters and leaves it on every poll. Yet nearly every request logs nothing but
//! its access line, which carries the id already. Here the handler's future is wrapped in
//! [`RequestScope`], which moves the id into a thread-local while it is polled (a pointer swap),
//! and the event formatter ([`SpanPrefix`]) writes the span's text into the few lines logged
//! meanwhile: byte for byte what the span-based formatter writes, text or JSON (the tests
//! compare the two). Used only where [`super::access`]'s fast path is (our own subscriber, no
//! ANSI colours); elsewhere the scope enters a real span instead ([`enabled`]). One future type
//! for both: two, in two branches, would each take their room in the request's future.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::request_id::RequestId;
use crate::config::LogFormat;

thread_local! {
    /// The id of the request whose future this thread is polling, if any.
    static CURRENT: Cell<Option<RequestId>> = const { Cell::new(None) };
}

/// Whether lines get the request id from [`RequestScope`] (else the handler needs a span).
pub fn enabled() -> bool {
    super::access::FORMAT.get().is_some()
}

pin_project_lite::pin_project! {
    /// A request's future, with its id in [`CURRENT`] (or its span entered, where [`enabled`]
    /// is false) while it is polled.
    pub struct RequestScope<F> {
        id: Option<RequestId>,
        span: tracing::Span,
        #[pin]
        inner: F,
    }
}

impl<F> RequestScope<F> {
    pub fn new(id: RequestId, inner: F) -> Self {
        if enabled() {
            Self::scoped(id, inner)
        } else {
            RequestScope {
                span: tracing::info_span!("request", request_id = %id),
                id: None,
                inner,
            }
        }
    }

    /// A scope that sets the thread-local (the tests use it whatever [`enabled`] says).
    fn scoped(id: RequestId, inner: F) -> Self {
        RequestScope {
            id: Some(id),
            span: tracing::Span::none(),
            inner,
        }
    }
}

impl<F: Future> Future for RequestScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        // Put back whatever was there: a scope polled inside another (none today) restores it.
        if this.id.is_none() {
            return this.inner.poll(cx);
        }
        let outer = CURRENT.with(|c| c.replace(this.id.take()));
        let out = this.inner.poll(cx);
        *this.id = CURRENT.with(|c| c.replace(outer));
        out
    }
}

/// The id of the request being polled on this thread.
fn current() -> Option<RequestId> {
    CURRENT.with(|c| {
        let id = c.take();
        let copy = id.clone();
        c.set(id);
        copy
    })
}

/// Wraps the installed event formatter: a line logged inside a [`RequestScope`] (and in no
/// span) gets the `request{request_id=…}` span the formatter would have written for it.
pub struct SpanPrefix<F> {
    inner: F,
    format: LogFormat,
}

impl<F> SpanPrefix<F> {
    pub fn new(inner: F, format: LogFormat) -> Self {
        SpanPrefix { inner, format }
    }
}

impl<S, N, F> FormatEvent<S, N> for SpanPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let id = match current() {
            Some(id) if !writer.has_ansi_escapes() && ctx.lookup_current().is_none() => id,
            _ => return self.inner.format_event(ctx, writer, event),
        };
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&with_span(line, self.format, id.as_str()))
    }
}

/// `line`, as written outside any span, as it is written inside `request{request_id=id}`.
fn with_span(mut line: String, format: LogFormat, id: &str) -> String {
    match format {
        // `{timestamp} {level:>5} {span}: {target}: …`: the span goes after the padded level.
        LogFormat::Pretty => {
            let Some(at) = line
                .find(' ')
                .map(|ts| ts + 7)
                .filter(|&at| at <= line.len())
            else {
                return line;
            };
            line.insert_str(at, &format!("request{{request_id={id}}}: "));
        }
        // `{…,"target":"…"}`: the current span and the span list close the object.
        LogFormat::Json => {
            let Some(at) = line.rfind('}') else {
                return line;
            };
            let span = format!(
                r#"{{"request_id":{},"name":"request"}}"#,
                serde_json::Value::from(id)
            );
            line.insert_str(at, &format!(r#","span":{span},"spans":[{span}]"#));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use tracing::Instrument;

    use super::super::Capture;
    use super::*;

    /// Two warnings and an error, as handlers log them.
    async fn handler() {
        tracing::warn!(error = "connection refused", "session store unavailable");
        tracing::warn!("access token record failed to authenticate; treating as unknown");
        tracing::error!(error = %"x \"y\" \\ z", purged = 3, "could not purge");
    }

    /// The lines of the future `run` makes (inside the subscriber, as a span must be), under the formatter the proxy installs for `format`
    /// (wrapped in [`SpanPrefix`] when `wrapped`), with tracing's timestamps cut out.
    fn logged<F: Future<Output = ()>>(
        format: LogFormat,
        wrapped: bool,
        run: impl FnOnce() -> F,
    ) -> Vec<String> {
        let cap = Capture::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(cap.clone())
            .with_ansi(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let run = || rt.block_on(run());
        match (format, wrapped) {
            (LogFormat::Json, false) => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), run)
            }
            (LogFormat::Json, true) => {
                let inner = tracing_subscriber::fmt::format().json().flatten_event(true);
                let b = builder.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new());
                tracing::subscriber::with_default(
                    b.event_format(SpanPrefix::new(inner, format)).finish(),
                    run,
                )
            }
            (LogFormat::Pretty, false) => tracing::subscriber::with_default(builder.finish(), run),
            (LogFormat::Pretty, true) => {
                let inner = tracing_subscriber::fmt::format();
                tracing::subscriber::with_default(
                    builder
                        .event_format(SpanPrefix::new(inner, format))
                        .finish(),
                    run,
                )
            }
        }
        let text = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| match format {
                LogFormat::Pretty => l[27..].to_owned(),
                LogFormat::Json => l[41..].to_owned(),
            })
            .collect()
    }

    #[test]
    fn lines_in_a_scope_are_the_ones_a_span_gives() {
        for format in [LogFormat::Pretty, LogFormat::Json] {
            for id in ["84c5e33250fb2e0f13fd2fc29802f1d1", "client-\"id\"\\{x}=y"] {
                let v = http::HeaderValue::from_str(id).unwrap();
                let rid = RequestId::parse(&v).unwrap();
                let reference = logged(format, false, || {
                    handler().instrument(tracing::info_span!("request", request_id = %rid))
                });
                let scoped = logged(format, true, || {
                    RequestScope::scoped(rid.clone(), handler())
                });
                assert_eq!(reference.len(), 3);
                assert!(
                    reference.iter().all(|l| l.contains("request_id")),
                    "{reference:?}"
                );
                assert_eq!(scoped, reference, "{format:?}");
            }
        }
    }

    #[test]
    fn lines_outside_a_scope_are_untouched() {
        for format in [LogFormat::Pretty, LogFormat::Json] {
            assert_eq!(
                logged(format, true, handler),
                logged(format, false, handler)
            );
        }
    }

    #[test]
    fn the_scope_ends_with_its_poll() {
        let v = http::HeaderValue::from_static("abc");
        let rid = RequestId::parse(&v).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let seen = rt.block_on(RequestScope::scoped(rid, async {
            tokio::task::yield_now().await;
            current()
        }));
        assert_eq!(seen.as_ref().map(RequestId::as_str), Some("abc"));
        assert!(current().is_none());
    }
}
