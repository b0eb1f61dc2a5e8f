//! Crash-safe persistence for `--data DIR`: a snapshot (`snapshot.json`) plus an append-only
//! JSON-lines write-ahead log (`wal.jsonl`).
//!
//! - Every mutating request appends full-state records (upserts, never deltas) and hands them to the
//!   kernel with one `write(2)` *before* its response is sent, so `kill -9` loses at most the request
//!   in flight. A background thread `fdatasync`s dirty logs every 50 ms (power loss: ≤ 50 ms).
//! - Replay applies records in order; a torn last line (crash mid-write) is discarded and truncated.
//! - Compaction writes `snapshot.json.tmp`, fsyncs, renames over `snapshot.json`, fsyncs the directory,
//!   then truncates the log. A crash anywhere leaves either the old or the new snapshot plus a log whose
//!   records are idempotent upserts, so replaying them again is harmless.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::EmulatorError;
use super::model::{Item, List, ListMeta, Site, SiteMeta};

/// Compact at runtime once the log grows past this.
pub const COMPACT_AT_BYTES: u64 = 256 * 1024 * 1024;

/// One log record. All are idempotent upserts keyed by id.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    Site {
        meta: SiteMeta,
    },
    List {
        site: String,
        meta: ListMeta,
    },
    Item {
        site: String,
        list: Uuid,
        item: Item,
    },
    Del {
        site: String,
        list: Uuid,
        id: u64,
        seq: u64,
    },
    DeltaEpoch {
        epoch: u64,
    },
    Reset,
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    delta_epoch: u64,
    sites: Vec<Site>,
}

/// The open log (or a no-op when running memory-only).
#[derive(Debug)]
pub struct Wal {
    file: Option<File>,
    dir: Option<PathBuf>,
    pending: Vec<u8>,
    written: u64,
    dirty: Arc<AtomicBool>,
}

impl Wal {
    pub fn disabled() -> Wal {
        Wal {
            file: None,
            dir: None,
            pending: Vec::new(),
            written: 0,
            dirty: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    pub fn record(&mut self, r: &Record) {
        if self.file.is_none() {
            return;
        }
        if serde_json::to_writer(&mut self.pending, r).is_ok() {
            self.pending.push(b'\n');
        }
    }

    /// Hands the pending records to the kernel in one write. Called before the response goes out.
    pub fn commit(&mut self) -> std::io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = f.write_all(&self.pending);
        self.written += self.pending.len() as u64;
        self.pending.clear();
        self.dirty.store(true, Ordering::Release);
        r
    }

    pub fn needs_compaction(&self) -> bool {
        self.written >= COMPACT_AT_BYTES
    }

    /// Writes a snapshot of `sites` and truncates the log.
    pub fn compact(&mut self, sites: &[Site], delta_epoch: u64) -> std::io::Result<()> {
        let (Some(dir), Some(f)) = (self.dir.clone(), self.file.as_mut()) else {
            return Ok(());
        };
        write_snapshot(&dir, sites, delta_epoch)?;
        f.set_len(0)?;
        f.sync_all()?;
        self.written = 0;
        Ok(())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

fn write_snapshot(dir: &Path, sites: &[Site], delta_epoch: u64) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct SnapshotRef<'a> {
        version: u32,
        delta_epoch: u64,
        sites: &'a [Site],
    }
    let tmp = dir.join("snapshot.json.tmp");
    {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        serde_json::to_writer(
            &mut f,
            &SnapshotRef {
                version: 1,
                delta_epoch,
                sites,
            },
        )?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join("snapshot.json"))?;
    File::open(dir)?.sync_all()
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EmulatorError + '_ {
    move |source| EmulatorError::Persistence {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads `dir` (snapshot + log replay), compacts it, and opens the log for appending.
/// Returns the sites, the delta epoch, the open log and the fsync thread's stop flag.
pub fn open(dir: &Path) -> Result<(Vec<Site>, u64, Wal, Arc<AtomicBool>), EmulatorError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let snap_path = dir.join("snapshot.json");
    let mut sites: Vec<Site> = Vec::new();
    let mut epoch = 0;
    if snap_path.exists() {
        let f = File::open(&snap_path).map_err(io_err(&snap_path))?;
        let snap: Snapshot =
            serde_json::from_reader(BufReader::new(f)).map_err(|e| EmulatorError::Corrupt {
                path: snap_path.clone(),
                detail: e.to_string(),
            })?;
        sites = snap.sites;
        epoch = snap.delta_epoch;
    }
    let wal_path = dir.join("wal.jsonl");
    if wal_path.exists() {
        let f = File::open(&wal_path).map_err(io_err(&wal_path))?;
        let mut reader = BufReader::new(f);
        let mut line = Vec::new();
        let mut good_len: u64 = 0;
        let mut lineno = 0usize;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(io_err(&wal_path))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            let complete = line.last() == Some(&b'\n');
            match serde_json::from_slice::<Record>(&line) {
                Ok(rec) if complete => {
                    apply(&mut sites, &mut epoch, rec);
                    good_len += n as u64;
                }
                // Only the final record can be torn: stop there and cut it off below.
                _ if !complete => break,
                Ok(_) => break,
                Err(e) => {
                    let rest_is_empty = reader.fill_buf().map(|b| b.is_empty()).unwrap_or(false);
                    if rest_is_empty {
                        break;
                    }
                    return Err(EmulatorError::Corrupt {
                        path: wal_path.clone(),
                        detail: format!("line {lineno}: {e}"),
                    });
                }
            }
        }
        let f = OpenOptions::new()
            .write(true)
            .open(&wal_path)
            .map_err(io_err(&wal_path))?;
        f.set_len(good_len).map_err(io_err(&wal_path))?;
    }
    for s in &mut sites {
        for l in &mut s.lists {
            l.rebuild_unique();
        }
    }
    write_snapshot(dir, &sites, epoch).map_err(io_err(&snap_path))?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&wal_path)
        .map_err(io_err(&wal_path))?;
    file.set_len(0).map_err(io_err(&wal_path))?;
    file.sync_all().map_err(io_err(&wal_path))?;
    let dirty = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sync_file = file.try_clone().map_err(io_err(&wal_path))?;
    {
        let (dirty, stop) = (dirty.clone(), stop.clone());
        std::thread::Builder::new()
            .name("emulator-wal-sync".into())
            .spawn(move || {
                // Ends on shutdown, or when the log itself is gone (an aborted server).
                while !stop.load(Ordering::Acquire) && Arc::strong_count(&dirty) > 1 {
                    std::thread::sleep(Duration::from_millis(50));
                    if dirty.swap(false, Ordering::AcqRel)
                        && let Err(e) = sync_file.sync_data()
                    {
                        tracing::error!(error = %e, "emulator: fsync of wal.jsonl failed");
                    }
                }
            })
            .map_err(io_err(&wal_path))?;
    }
    let wal = Wal {
        file: Some(file),
        dir: Some(dir.to_path_buf()),
        pending: Vec::new(),
        written: 0,
        dirty,
    };
    Ok((sites, epoch, wal, stop))
}

/// Applies one record to in-memory sites (used by replay only).
fn apply(sites: &mut Vec<Site>, epoch: &mut u64, rec: Record) {
    let find_list = |sites: &mut Vec<Site>, site: &str, list: Uuid| -> Option<(usize, usize)> {
        let si = sites.iter().position(|s| s.meta.id == site)?;
        let li = sites[si].lists.iter().position(|l| l.meta.id == list)?;
        Some((si, li))
    };
    match rec {
        Record::Site { meta } => {
            if let Some(s) = sites.iter_mut().find(|s| s.meta.id == meta.id) {
                s.meta = meta;
            } else {
                sites.push(Site {
                    meta,
                    lists: Vec::new(),
                });
            }
        }
        Record::List { site, meta } => {
            let Some(s) = sites.iter_mut().find(|s| s.meta.id == site) else {
                return;
            };
            if let Some(l) = s.lists.iter_mut().find(|l| l.meta.id == meta.id) {
                let (next_id, seq) = (l.meta.next_id.max(meta.next_id), l.meta.seq.max(meta.seq));
                l.meta = meta;
                l.meta.next_id = next_id;
                l.meta.seq = seq;
            } else {
                s.lists.push(List::new(meta));
            }
        }
        Record::Item { site, list, item } => {
            let Some((si, li)) = find_list(sites, &site, list) else {
                return;
            };
            let l = &mut sites[si].lists[li];
            l.meta.next_id = l.meta.next_id.max(item.id + 1);
            l.meta.seq = l.meta.seq.max(item.seq);
            l.items.insert(item.id, item);
        }
        Record::Del {
            site,
            list,
            id,
            seq,
        } => {
            let Some((si, li)) = find_list(sites, &site, list) else {
                return;
            };
            let l = &mut sites[si].lists[li];
            l.items.remove(&id);
            l.meta.seq = l.meta.seq.max(seq);
            l.meta.next_id = l.meta.next_id.max(id + 1);
            if l.tombstones.entries.back().is_none_or(|(s, _)| *s < seq) {
                l.push_tombstone(seq, id);
            }
        }
        Record::DeltaEpoch { epoch: e } => *epoch = (*epoch).max(e),
        Record::Reset => sites.clear(),
    }
}
