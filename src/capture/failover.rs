//! Following the primary of a replicated source (`source.urls`: primary first, then standbys).
//!
//! Before each lock acquisition the run loop ([`super::run`]) asks `Instances::select` for the
//! primary: the first listed instance that accepts connections and is not in recovery
//! ([`crate::pg::find_primary`]), waiting with backoff while none is (the standby is not promoted
//! yet). When that is another instance than before, it is a failover: the session that follows
//! resumes the slot there (on PostgreSQL 17+ the slot is created with `failover = true`, so the
//! standby's synced copy is there, at or before the acknowledged LSN, and reading resumes at the
//! acknowledged LSN), or, when the promoted instance has no such slot (PostgreSQL ≤ 16, or slot
//! synchronisation not configured), creates a new slot with an exported snapshot and reads every
//! captured table again; the processor's ledger absorbs rows that are already in the lists (no
//! duplicate items, unchanged rows cost no write). Each failover is logged and reported on
//! [`super::CaptureConfig::failover_reports`] (the runtime records it as a `failover` run).

use tokio_util::sync::CancellationToken;

use super::config::CaptureConfig;
use super::run::Backoff;
use crate::config::PgUrl;
use crate::telemetry::metrics as m;

/// One failover, as reported once the session on the new primary opened the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// `host:port` of the instance read before (no credentials).
    pub from: String,
    /// `host:port` of the promoted instance read now.
    pub to: String,
    /// The promoted instance had no usable slot: a new one was created and every captured table
    /// is read again (see the module docs).
    pub resnapshot: bool,
}

/// The instances of the source and which one capture reads.
#[derive(Debug)]
pub(super) struct Instances {
    urls: Vec<String>,
    current: Option<usize>,
}

impl Instances {
    pub(super) fn new(config: &CaptureConfig) -> Self {
        Self {
            urls: config.failover_urls.clone(),
            current: None,
        }
    }

    /// Points `config.source_url` at the primary. With a single instance configured, nothing to
    /// choose (connection errors surface in the session as before). Waits (with backoff) while no
    /// instance is a primary. Returns the failover when the primary changed, and None inside
    /// `Some` when it did not; the outer None means shutdown.
    pub(super) async fn select(
        &mut self,
        config: &mut CaptureConfig,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Option<Option<Failover>> {
        if self.urls.len() < 2 {
            return Some(None);
        }
        let mut waiting_logged = false;
        let next = loop {
            if let Some(i) = crate::pg::find_primary(&self.urls).await {
                break i;
            }
            if !waiting_logged {
                tracing::warn!(pipeline = %config.pipeline, "no source instance is a primary; waiting for one to be promoted");
                waiting_logged = true;
            }
            if !backoff.sleep(shutdown).await {
                return None;
            }
        };
        let previous = self.current.replace(next);
        config.source_url = self.urls[next].clone();
        match previous {
            Some(p) if p != next => {
                let (from, to) = (server(&self.urls[p]), server(&self.urls[next]));
                tracing::warn!(pipeline = %config.pipeline, %from, %to, "source failover: the primary moved; capture resumes on the promoted instance");
                metrics::counter!(m::CAPTURE_FAILOVERS_TOTAL, "pipeline" => config.pipeline.clone())
                    .increment(1);
                Some(Some(Failover {
                    from,
                    to,
                    resnapshot: false,
                }))
            }
            _ => Some(None),
        }
    }
}

/// `host:port` of a libpq URL, for logs and reports (never the credentials).
fn server(url: &str) -> String {
    match PgUrl::parse(url) {
        Ok(u) => {
            let (host, port) = u.server();
            format!("{host}:{port}")
        }
        Err(_) => "?".into(),
    }
}

/// Hands a failover to whoever listens, without ever blocking capture.
pub(super) fn report(config: &CaptureConfig, failover: Failover) {
    if let Some(tx) = &config.failover_reports
        && tx.try_send(failover).is_err()
    {
        tracing::warn!(pipeline = %config.pipeline, "failover report dropped (nobody listens or too many)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_host_and_port_without_credentials() {
        assert_eq!(
            server("postgres://u:secret@db2.example:5433/app?sslmode=disable"),
            "db2.example:5433"
        );
        assert_eq!(server("not a url"), "?");
    }

    #[tokio::test]
    async fn a_single_instance_is_never_probed() {
        let mut config = CaptureConfig::new(
            "p",
            "postgres://x@127.0.0.1:1/db?sslmode=disable",
            vec![],
            "/tmp",
        );
        let mut instances = Instances::new(&config);
        let mut backoff = Backoff::new(std::time::Duration::from_millis(1));
        let got = instances
            .select(&mut config, &mut backoff, &CancellationToken::new())
            .await;
        assert_eq!(got, Some(None));
        assert_eq!(
            config.source_url,
            "postgres://x@127.0.0.1:1/db?sslmode=disable"
        );
    }

    #[tokio::test]
    async fn no_reachable_primary_waits_until_shutdown() {
        let mut config = CaptureConfig::new("p", "", vec![], "/tmp");
        config.failover_urls = vec![
            "postgres://x@127.0.0.1:1/db?sslmode=disable".into(),
            "postgres://x@127.0.0.1:2/db?sslmode=disable".into(),
        ];
        let mut instances = Instances::new(&config);
        let mut backoff = Backoff::new(std::time::Duration::from_millis(1));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let got = instances.select(&mut config, &mut backoff, &shutdown).await;
        assert_eq!(got, None);
    }
}
