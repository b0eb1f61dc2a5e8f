//! The `email` target: one plain-text message per notification over SMTP (lettre).
//!
//! `smtps://host[:465]`: implicit TLS; `smtp://host[:587]`: STARTTLS required, except on a
//! loopback host (a local relay or test sink), where the session stays plain. Credentials come
//! from the URL's user info (percent-decoded). Errors say what failed, never the URL.

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use percent_encoding::percent_decode_str;
use url::Url;

use super::{Notification, SEND_TIMEOUT, State};
use crate::config::{NotifyTarget, is_loopback_host};

type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// Sends `n` to the target's recipients.
pub async fn send(target: &NotifyTarget, n: &Notification) -> Result<(), String> {
    let transport = transport(target)?;
    let message = message(target, n)?;
    transport
        .send(message)
        .await
        .map(|_| ())
        .map_err(|e| match e.status() {
            Some(code) => format!("SMTP server answered {code}"),
            None if e.is_timeout() => "SMTP timed out".into(),
            None => "SMTP connection or TLS failed".into(),
        })
}

fn transport(target: &NotifyTarget) -> Result<Transport, String> {
    let url = Url::parse(target.url.expose()).map_err(|_| "the SMTP URL does not parse")?;
    let host = url.host_str().ok_or("the SMTP URL has no host")?;
    let builder = match url.scheme() {
        "smtps" => Transport::relay(host),
        _ if is_loopback_host(&url) => Ok(Transport::builder_dangerous(host)),
        _ => Transport::starttls_relay(host),
    }
    .map_err(|_| "cannot set up TLS for the SMTP host")?;
    let mut builder = builder.timeout(Some(SEND_TIMEOUT));
    if let Some(port) = url.port() {
        builder = builder.port(port);
    }
    if !url.username().is_empty() {
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let password = decode(url.password().unwrap_or_default());
        builder = builder.credentials(Credentials::new(decode(url.username()), password));
    }
    Ok(builder.build())
}

fn message(target: &NotifyTarget, n: &Notification) -> Result<Message, String> {
    let from = target.from.as_deref().ok_or("no `from` address")?;
    let mut m = Message::builder()
        .from(from.parse().map_err(|_| "bad `from` address")?)
        .subject(subject(n));
    for to in &target.to {
        m = m.to(to.parse().map_err(|_| "bad `to` address")?);
    }
    let body = format!(
        "Pipeline: {}\nCondition: {}\nState: {}\nAt: {}\n\n{}\n{}\n",
        n.pipeline,
        n.condition,
        state_word(n.state),
        n.at,
        n.summary,
        n.detail
    );
    m.header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot build the message: {e}"))
}

/// `[SyncBridge orders] FIRING: 3 dead letters in the last 300 s`.
pub fn subject(n: &Notification) -> String {
    format!(
        "[SyncBridge {}] {}: {}",
        n.pipeline,
        state_word(n.state).to_uppercase(),
        n.summary
    )
}

fn state_word(s: State) -> &'static str {
    match s {
        State::Firing => "firing",
        State::Resolved => "resolved",
    }
}
