//! Drift reports in the meta-store (issue 14): a check's full report — every difference — takes
//! the runs' way: appended to `<prefix>.<pipeline>.drift` first ([`append_report`]), written to
//! `syncbridge_meta.drift_reports` / `drift_differences` by the drift projector
//! ([`super::Projection::Drift`], [`project`]), read back by `GET /pipelines/{p}/drift[/{run}]`
//! ([`latest`], [`report_page`]).
//!
//! A report is several records keyed by its run id (one partition keeps them in order): the
//! differences in chunks of [`CHUNK`], then the header (the report without its differences).
//! Since the header comes last, a projected header means every chunk before it is projected: a
//! reader never sees a partial report. Each insert is `ON CONFLICT DO NOTHING`, so a record read
//! twice changes nothing.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use uuid::Uuid;

use super::{MetaDb, MetaError};
use crate::log::{EventLog, Record, TopicSpec};
use crate::process::drift::{Difference, DriftReport};

/// Partitions of a drift topic: one, so a report's records stay in append order.
pub const DRIFT_PARTITIONS: i32 = 1;
/// Differences per record: about 100 KB of JSON, well under a broker's default 1 MB limit.
pub const CHUNK: usize = 500;

/// `<prefix>.<pipeline>.drift`: append-only, keyed by run id.
pub fn drift_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.drift")
}

/// Creates a drift topic unless it exists.
pub async fn ensure_drift_topic<L: EventLog>(log: &L, topic: &str) -> Result<(), MetaError> {
    log.ensure_topic(&TopicSpec::new(topic, DRIFT_PARTITIONS))
        .await?;
    Ok(())
}

/// One record of a drift topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DriftRecord {
    /// Differences `first..first + differences.len()` of run `run_id`'s report.
    Differences {
        run_id: Uuid,
        first: u64,
        differences: Vec<Difference>,
    },
    /// The report without its differences; appended after them.
    Report { report: Box<DriftReport> },
}

impl DriftRecord {
    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        serde_json::from_slice(bytes).map_err(|e| MetaError::Decode(e.to_string()))
    }
}

/// The records of `report` (see the module docs).
pub fn records(report: &DriftReport) -> Result<Vec<DriftRecord>, MetaError> {
    let run_id = run_uuid(&report.run_id)?;
    let mut out: Vec<DriftRecord> = report
        .differences
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| DriftRecord::Differences {
            run_id,
            first: (i * CHUNK) as u64,
            differences: c.to_vec(),
        })
        .collect();
    out.push(DriftRecord::Report {
        report: Box::new(DriftReport {
            differences: Vec::new(),
            ..report.clone()
        }),
    });
    Ok(out)
}

fn run_uuid(run_id: &str) -> Result<Uuid, MetaError> {
    run_id
        .parse()
        .map_err(|_| MetaError::Decode(format!("drift report of run {run_id:?}: not a UUID")))
}

/// Appends `report` to `topic`, durable on return.
pub async fn append_report<L: EventLog>(
    log: &L,
    topic: &str,
    report: &DriftReport,
) -> Result<(), MetaError> {
    let key = run_uuid(&report.run_id)?.as_bytes().to_vec();
    let recs = records(report)?
        .iter()
        .map(|r| Record::new(key.clone(), r.encode()))
        .collect();
    log.append(topic, recs).await?;
    Ok(())
}

/// Writes `records` (inside the projector's transaction).
pub(crate) async fn project(client: &Client, records: &[DriftRecord]) -> Result<(), MetaError> {
    for r in records {
        match r {
            DriftRecord::Differences {
                run_id,
                first,
                differences,
            } => insert_differences(client, *run_id, *first, differences).await?,
            DriftRecord::Report { report } => insert_report(client, report).await?,
        }
    }
    Ok(())
}

async fn insert_report(client: &Client, report: &DriftReport) -> Result<(), MetaError> {
    let run_id = run_uuid(&report.run_id)?;
    let body = serde_json::to_value(report).map_err(|e| MetaError::Decode(e.to_string()))?;
    let total = i64::try_from(report.counts.total()).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO syncbridge_meta.drift_reports (run_id, pipeline, started_ms, \
             finished_ms, differences, report) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (run_id) DO NOTHING",
            &[
                &run_id,
                &report.pipeline,
                &report.started_ms,
                &report.finished_ms,
                &total,
                &body,
            ],
        )
        .await?;
    Ok(())
}

async fn insert_differences(
    client: &Client,
    run_id: Uuid,
    first: u64,
    diffs: &[Difference],
) -> Result<(), MetaError> {
    let first = i64::try_from(first).unwrap_or(i64::MAX);
    let idx: Vec<i64> = (0..diffs.len() as i64).map(|i| first + i).collect();
    let body = diffs
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MetaError::Decode(e.to_string()))?;
    let class: Vec<String> = body
        .iter()
        .map(|d| d["class"].as_str().unwrap_or_default().to_string())
        .collect();
    client
        .execute(
            "INSERT INTO syncbridge_meta.drift_differences (run_id, idx, class, difference) \
             SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::jsonb[]) \
             ON CONFLICT (run_id, idx) DO NOTHING",
            &[&run_id, &idx, &class, &body],
        )
        .await?;
    Ok(())
}

/// Differences per page of `GET /pipelines/{p}/drift[/{run}]` by default, and at most.
pub const DEFAULT_PAGE: i64 = 500;
pub const MAX_PAGE: i64 = 5000;

/// The run id of `pipeline`'s latest projected report (by finish time).
pub async fn latest(db: &MetaDb, pipeline: &str) -> Result<Option<Uuid>, MetaError> {
    let row = db
        .client()
        .await?
        .query_opt(
            "SELECT run_id FROM syncbridge_meta.drift_reports WHERE pipeline = $1 \
             ORDER BY finished_ms DESC, run_id DESC LIMIT 1",
            &[&pipeline],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Report `run_id` of `pipeline` with differences `after..after + limit` (by index) and, when
/// more follow, `next` set to the `after` of the next page. `None`: no such report.
pub async fn report_page(
    db: &MetaDb,
    pipeline: &str,
    run_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Option<DriftReport>, MetaError> {
    let client = db.client().await?;
    let Some(row) = client
        .query_opt(
            "SELECT report FROM syncbridge_meta.drift_reports WHERE run_id = $1 AND pipeline = $2",
            &[&run_id, &pipeline],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut report: DriftReport = serde_json::from_value(row.get(0))
        .map_err(|e| MetaError::Decode(format!("drift report {run_id}: {e}")))?;
    // One more than asked for tells whether another page follows.
    let rows = client
        .query(
            "SELECT idx, difference FROM syncbridge_meta.drift_differences \
             WHERE run_id = $1 AND idx >= $2 ORDER BY idx LIMIT $3",
            &[&run_id, &after, &(limit + 1)],
        )
        .await?;
    for r in rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
    {
        let d = serde_json::from_value(r.get(1))
            .map_err(|e| MetaError::Decode(format!("drift report {run_id}: {e}")))?;
        report.differences.push(d);
    }
    report.next = rows
        .get(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|r| r.get::<_, i64>(0) as u64);
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::drift::{ClassCounts, DriftClass};

    fn diff(key: u64) -> Difference {
        Difference {
            class: DriftClass::Missing,
            table: "public.t".into(),
            key: key.to_string(),
            list: "L".into(),
            item_id: None,
            etag: None,
            fields: Vec::new(),
        }
    }

    #[test]
    fn a_report_is_chunks_then_its_header_and_round_trips() {
        let differences: Vec<_> = (0..CHUNK as u64 + 3).map(diff).collect();
        let report = DriftReport {
            pipeline: "p".into(),
            run_id: Uuid::new_v4().to_string(),
            started_ms: 1,
            finished_ms: 2,
            counts: ClassCounts::of(&differences),
            lists: Vec::new(),
            differences,
            in_flight: 0,
            graph_requests: 1,
            resource_units: 2,
            healed: None,
            next: None,
        };
        let recs = records(&report).unwrap();
        assert_eq!(recs.len(), 3);
        let back: Vec<_> = recs
            .iter()
            .map(|r| DriftRecord::decode(&r.encode()).unwrap())
            .collect();
        assert_eq!(back, recs);
        let DriftRecord::Differences {
            first, differences, ..
        } = &back[1]
        else {
            panic!("{back:?}")
        };
        assert_eq!((*first, differences.len()), (CHUNK as u64, 3));
        let DriftRecord::Report { report: header } = &back[2] else {
            panic!("{back:?}")
        };
        assert!(header.differences.is_empty());
        assert_eq!(header.counts.missing, CHUNK as u64 + 3);
        let bad = DriftReport {
            run_id: "x".into(),
            ..report
        };
        assert!(records(&bad).is_err());
    }
}
