//! The wire formats of notifications, one per [`NotifyKind`].

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::{Notification, State};
use crate::config::{NotifyKind, NotifyTarget};

/// The webhook signature header: `sha256=<hex HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "X-SyncBridge-Signature";

/// The body to POST and, for a webhook, its signature header value.
pub fn render(target: &NotifyTarget, n: &Notification) -> (Vec<u8>, Option<String>) {
    match target.kind {
        NotifyKind::Webhook => {
            let body = serde_json::to_vec(n).unwrap_or_default();
            let sig = target
                .secret
                .as_ref()
                .map(|s| format!("sha256={}", sign(s.expose().as_bytes(), &body)));
            (body, sig)
        }
        NotifyKind::Teams => (teams_card(n).to_string().into_bytes(), None),
        NotifyKind::Slack => {
            let icon = match n.state {
                State::Firing => ":rotating_light:",
                State::Resolved => ":white_check_mark:",
            };
            let text = format!("{icon} *{}*: {}\n{}", n.pipeline, n.summary, n.detail);
            (
                json!({ "text": text.trim_end() }).to_string().into_bytes(),
                None,
            )
        }
        // Sent by `super::email`, not over HTTP: the plain JSON for completeness.
        NotifyKind::Email => (serde_json::to_vec(n).unwrap_or_default(), None),
    }
}

/// Hex HMAC-SHA256 of `body` under `key`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// A Teams message with one Adaptive Card (schema 1.4, what incoming webhooks and workflows
/// render).
fn teams_card(n: &Notification) -> serde_json::Value {
    let color = match n.state {
        State::Firing => "attention",
        State::Resolved => "good",
    };
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    { "type": "TextBlock", "size": "Medium", "weight": "Bolder", "color": color,
                      "text": format!("SyncBridge {}: {}", n.pipeline, n.summary), "wrap": true },
                    { "type": "TextBlock", "text": n.detail, "wrap": true, "isSubtle": true },
                    { "type": "FactSet", "facts": [
                        { "title": "Condition", "value": n.condition },
                        { "title": "State", "value": format!("{:?}", n.state).to_lowercase() },
                        { "title": "At", "value": n.at },
                    ]},
                ],
            },
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn webhook_bodies_are_signed_and_others_are_not() {
        let n = Notification {
            pipeline: "p".into(),
            condition: "dead_letters".into(),
            state: State::Firing,
            summary: "3 dead letters".into(),
            detail: String::new(),
            at: "2026-12-07T10:00:00.000Z".into(),
        };
        let mut t = NotifyTarget {
            name: "t".into(),
            kind: NotifyKind::Webhook,
            url: Secret::new("https://example.invalid/hook?token=abc"),
            secret: Some(Secret::new("key")),
            from: None,
            to: Vec::new(),
        };
        let (body, sig) = render(&t, &n);
        assert_eq!(sig.unwrap(), format!("sha256={}", sign(b"key", &body)));
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let text = String::from_utf8(body).unwrap();
        assert!(
            !text.contains("token=abc") && !text.contains("key"),
            "{text}"
        );
        t.kind = NotifyKind::Teams;
        let (card, sig) = render(&t, &n);
        assert!(sig.is_none());
        let card: serde_json::Value = serde_json::from_slice(&card).unwrap();
        assert_eq!(card["attachments"][0]["content"]["type"], "AdaptiveCard");
        t.kind = NotifyKind::Slack;
        let (slack, _) = render(&t, &n);
        let slack: serde_json::Value = serde_json::from_slice(&slack).unwrap();
        assert!(slack["text"].as_str().unwrap().contains("3 dead letters"));
    }
}
