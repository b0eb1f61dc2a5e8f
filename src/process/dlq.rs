//! Dead letters: rows SharePoint cannot hold (too long, unknown choice, wrong type, out of range,
//! unknown user, missing lookup target) and writes Graph rejected with a 4xx. The pipeline
//! continues; each dead letter goes to `<prefix>.<pipeline>.dlq` with the reason, the row key,
//! Graph's request ids and the original change event (so it can be replayed unchanged).
//!
//! `syncbridge dlq list` shows the entries after the replay group's position;
//! `syncbridge dlq replay` appends each entry's original event back to its source topic (the
//! processor then handles it like any event: if a newer change of the row was written since, the
//! stale replay is skipped by the ledger's LSN check) and moves the replay group past them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::log::{EventLog, LogConsumer, LogError, Record, TopicSpec};

/// One partition: dead letters are rare and an operator reads them in order.
pub const DLQ_PARTITIONS: i32 = 1;
/// Header naming the reason kind, for consumers that filter without parsing the value.
pub const REASON_HEADER: &str = "sb.reason";

/// `<prefix>.<pipeline>.dlq`.
pub fn dlq_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.dlq")
}

/// The consumer group that tracks what was replayed.
pub fn replay_group(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.dlq-replay")
}

/// Where the dead-lettered event came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One dead letter (the JSON value of a DLQ record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub pipeline: String,
    /// `schema.table`.
    pub table: String,
    /// The row's SyncKey (encoded primary key).
    pub key: String,
    /// `too_long`, `unknown_choice`, `type_mismatch`, `out_of_range`, `unknown_user`,
    /// `lookup_missing`, `graph_rejected`, `undecodable`.
    pub kind: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// HTTP status of Graph's refusal (`graph_rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePosition>,
    /// The original event's key and value, base64 (standard alphabet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_key_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_value_b64: Option<String>,
    pub at_ms: i64,
}

impl DeadLetter {
    /// The log record for this dead letter.
    pub fn to_record(&self) -> Record {
        let value = serde_json::to_vec(self).unwrap_or_default();
        Record::new(
            format!("{}\u{0}{}", self.table, self.key).into_bytes(),
            value,
        )
        .with_header(REASON_HEADER, self.kind.as_bytes().to_vec())
    }

    /// Attaches the original event.
    pub fn with_event(mut self, key: &[u8], value: Option<&[u8]>) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        self.event_key_b64 = Some(b64.encode(key));
        self.event_value_b64 = value.map(|v| b64.encode(v));
        self
    }
}

/// One line per dead letter, for `syncbridge dlq list`.
pub fn describe(d: &DeadLetter, offset: i64) -> String {
    format!(
        "#{offset} {table} key={key} [{kind}] {reason}{list}{rid}",
        table = d.table,
        key = d.key,
        kind = d.kind,
        reason = d.reason,
        list = d
            .list
            .as_ref()
            .map(|l| format!(" list={l:?}"))
            .unwrap_or_default(),
        rid = d
            .request_id
            .as_ref()
            .map(|r| format!(" request-id={r}"))
            .unwrap_or_default(),
    )
}

/// Dead letters after the replay group's position, with their offsets.
pub async fn pending<L: EventLog>(
    log: &L,
    prefix: &str,
    pipeline: &str,
) -> Result<Vec<(i64, DeadLetter)>, LogError> {
    let topic = dlq_topic(prefix, pipeline);
    log.ensure_topic(&TopicSpec::new(topic.clone(), DLQ_PARTITIONS))
        .await?;
    let end = log.end_offsets(&topic).await?.first().copied().unwrap_or(0);
    let group = replay_group(prefix, pipeline);
    let start = log
        .committed(&group, std::slice::from_ref(&topic))
        .await?
        .get(&(topic.clone(), 0))
        .copied()
        .unwrap_or(0);
    let mut out = Vec::new();
    if start >= end {
        return Ok(out);
    }
    let stop = CancellationToken::new();
    let mut c = log
        .consumer(&group, std::slice::from_ref(&topic), stop.clone())
        .await?;
    loop {
        // Bounded: a record below the end offset is durable, so it arrives promptly.
        let r = match tokio::time::timeout(std::time::Duration::from_secs(10), c.recv()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => return Err(e),
        };
        if let Some(v) = &r.record.value
            && let Ok(d) = serde_json::from_slice::<DeadLetter>(v)
        {
            out.push((r.offset, d));
        }
        if r.offset + 1 >= end {
            break;
        }
    }
    stop.cancel();
    Ok(out)
}

/// Re-appends every pending dead letter's original event to its source topic, then commits the
/// replay group past them. Returns how many were replayed.
pub async fn replay<L: EventLog>(log: &L, prefix: &str, pipeline: &str) -> Result<usize, LogError> {
    let entries = pending(log, prefix, pipeline).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut n = 0;
    let mut last = None;
    for (offset, d) in &entries {
        last = Some(*offset);
        let (Some(src), Some(k)) = (&d.source, &d.event_key_b64) else {
            continue;
        };
        let key = b64.decode(k).unwrap_or_default();
        let value = d.event_value_b64.as_ref().and_then(|v| b64.decode(v).ok());
        let record = Record {
            key,
            value,
            headers: vec![("sb.replayed-from".into(), offset.to_string().into_bytes())],
            timestamp_ms: d.at_ms,
        };
        log.append(&src.topic, vec![record]).await?;
        n += 1;
    }
    if let Some(last) = last {
        let topic = dlq_topic(prefix, pipeline);
        let stop = CancellationToken::new();
        let mut c = log
            .consumer(
                &replay_group(prefix, pipeline),
                std::slice::from_ref(&topic),
                stop.clone(),
            )
            .await?;
        c.commit(&topic, 0, last + 1).await?;
        stop.cancel();
    }
    Ok(n)
}
