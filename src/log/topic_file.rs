//! The data file of one non-compacted embedded topic: an append-only sequence of frames.
//!
//! A frame holds consecutive records of one partition (a codec segment) behind a header:
//!
//! `[len u32][crc32 u32][flags u8][partition u32][first_offset i64][count u32][segment]`
//!
//! `len` counts the bytes after the crc; the crc (CRC-32, IEEE) covers those same bytes. Every
//! append writes its frames back to back and marks the last one [`LAST_OF_APPEND`], then
//! `fdatasync`s the file. Only then is the append acknowledged, so after a crash the file is a
//! run of complete appends followed by at most one torn one; opening the file finds the end of
//! the last complete append and cuts the rest (an append is all or nothing, as before).
//!
//! Why not sled: sled's cost, in CPU and resident memory, grows with the data written through it
//! (it kept ~230 MB resident after 3 M change events), while a CDC topic is only ever appended
//! to and read forward — a file does exactly that, and the kernel's page cache (not our heap)
//! holds the hot tail.
//!
//! Finding a record: a sparse in-memory index per partition (one entry per
//! [`INDEX_INTERVAL_BYTES`] of file) gives a frame at or before it; from there a reader walks
//! frame headers forward. The index is rebuilt from the headers when the file is opened; only
//! frames past the last durable length recorded in sled (the checkpoint) have their crc checked
//! then, as only those can be torn.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::{LogError, Record, codec};

/// Header bytes before the segment.
pub(crate) const FRAME_HEADER_BYTES: usize = 4 + 4 + 1 + 4 + 8 + 4;

/// Flag on the last frame of one append.
const LAST_OF_APPEND: u8 = 1;

/// Size a frame is closed at (it may exceed it by one record). Small enough that a consumer
/// fetching a few hundred records reads little beyond them, large enough that headers and
/// syscalls are a rounding error.
pub(crate) const FRAME_TARGET_BYTES: usize = 64 * 1024;

/// File bytes between two index entries of a partition. Bounds the index to ~16 bytes per
/// 64 KiB however small the appends are, and a seek to a few dozen header reads.
const INDEX_INTERVAL_BYTES: u64 = 64 * 1024;

/// A frame's header, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// File position of the frame.
    pub pos: u64,
    /// Bytes after the crc.
    len: u32,
    crc: u32,
    flags: u8,
    pub partition: i32,
    pub first_offset: i64,
    pub count: u32,
}

impl FrameHeader {
    /// Position just past the frame.
    pub(crate) fn end(&self) -> u64 {
        self.pos + 8 + u64::from(self.len)
    }

    /// One past the last offset in the frame.
    pub(crate) fn end_offset(&self) -> i64 {
        self.first_offset + i64::from(self.count)
    }

    fn parse(pos: u64, b: &[u8; FRAME_HEADER_BYTES]) -> Self {
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut first = [0u8; 8];
        first.copy_from_slice(&b[13..21]);
        Self {
            pos,
            len: u32_at(0),
            crc: u32_at(4),
            flags: b[8],
            partition: u32_at(9) as i32,
            first_offset: i64::from_be_bytes(first),
            count: u32_at(21),
        }
    }
}

/// A frame being filled with records of one partition.
#[derive(Debug)]
pub(crate) struct FrameBuf {
    partition: i32,
    first_offset: i64,
    seg: codec::SegmentBuf,
}

impl FrameBuf {
    pub(crate) fn new(partition: i32, first_offset: i64) -> Self {
        Self {
            partition,
            first_offset,
            seg: codec::SegmentBuf::with_reserved(FRAME_HEADER_BYTES, FRAME_TARGET_BYTES + 1024),
        }
    }

    pub(crate) fn push(&mut self, r: &Record) -> Result<(), LogError> {
        self.seg.push(r)
    }

    /// Whether the frame reached [`FRAME_TARGET_BYTES`].
    pub(crate) fn is_full(&self) -> bool {
        self.seg.len() >= FRAME_TARGET_BYTES
    }

    /// The complete frame bytes with header and crc.
    fn finish(self, last: bool) -> Result<Vec<u8>, LogError> {
        let count = self.seg.count();
        let mut buf = self.seg.finish();
        let len = u32::try_from(buf.len() - 8)
            .map_err(|_| LogError::InvalidArgument("frame larger than 4 GiB".into()))?;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        buf[8] = if last { LAST_OF_APPEND } else { 0 };
        buf[9..13].copy_from_slice(&(self.partition as u32).to_be_bytes());
        buf[13..21].copy_from_slice(&self.first_offset.to_be_bytes());
        buf[21..25].copy_from_slice(&count.to_be_bytes());
        let crc = crc32fast::hash(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_be_bytes());
        Ok(buf)
    }
}

/// Writer-side state, guarded by one lock (appends to a topic are serialised by its owner too).
#[derive(Debug)]
struct WriteState {
    /// Bytes written (durable or not).
    len: u64,
    /// Position of each partition's last index entry.
    last_indexed: Vec<Option<u64>>,
}

/// One topic's data file. Shared by the writer and every consumer of the topic.
#[derive(Debug)]
pub(crate) struct TopicFile {
    path: PathBuf,
    file: Arc<File>,
    write: Mutex<WriteState>,
    /// Per partition, `(first offset, frame position)` ascending, one per [`INDEX_INTERVAL_BYTES`].
    index: RwLock<Vec<Vec<(i64, u64)>>>,
    /// Bytes that are complete and fsynced: readers stop here.
    durable_len: AtomicU64,
    /// A write or fsync failed in a way that leaves the file's tail unknown: refuse further
    /// appends until a restart re-reads the file (what happened to the data is then certain).
    broken: AtomicBool,
}

/// What [`TopicFile::open`] found.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub file: TopicFile,
    /// Next offset per partition.
    pub next: Vec<i64>,
    /// Bytes of a torn append that were cut off the end.
    pub cut_bytes: u64,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> LogError + 'a {
    move |source| LogError::File {
        path: path.to_owned(),
        op,
        source,
    }
}

impl TopicFile {
    /// The file of `topic` in `dir`.
    pub(crate) fn path_in(dir: &Path, topic: &str) -> PathBuf {
        dir.join(format!("{topic}.log"))
    }

    /// Creates (or empties) the file of a new topic and makes its directory entry durable.
    /// A leftover file can only come from a creation that crashed before the topic was
    /// recorded, so nothing in it was ever acknowledged.
    pub(crate) fn create(dir: &Path, topic: &str, partitions: i32) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
        let path = Self::path_in(dir, topic);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path, "create"))?;
        file.sync_all().map_err(io_err(&path, "fsync"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "fsync directory"))?;
        Ok(Self::new(path, file, partitions, 0, Vec::new()))
    }

    fn new(
        path: PathBuf,
        file: File,
        partitions: i32,
        len: u64,
        index: Vec<Vec<(i64, u64)>>,
    ) -> Self {
        let n = partitions as usize;
        let mut index = index;
        index.resize(n, Vec::new());
        let last_indexed = index.iter().map(|e| e.last().map(|&(_, p)| p)).collect();
        Self {
            path,
            file: Arc::new(file),
            write: Mutex::new(WriteState { len, last_indexed }),
            index: RwLock::new(index),
            durable_len: AtomicU64::new(len),
            broken: AtomicBool::new(false),
        }
    }

    /// Opens the file of an existing topic: rebuilds the index and next offsets from the frame
    /// headers, checks the crc of every frame past `checkpoint` (the durable length last
    /// recorded) and cuts a torn append off the end.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] when a frame before the checkpoint is malformed or the file is
    /// shorter than the checkpoint: acknowledged data is damaged and we refuse to guess.
    pub(crate) fn open(
        dir: &Path,
        topic: &str,
        partitions: i32,
        checkpoint: u64,
    ) -> Result<Recovered, LogError> {
        let path = Self::path_in(dir, topic);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open"))?;
        let file_len = file.metadata().map_err(io_err(&path, "stat"))?.len();
        if file_len < checkpoint {
            return Err(LogError::Corrupt(format!(
                "{}: {file_len} bytes, but {checkpoint} were acknowledged as durable",
                path.display()
            )));
        }
        let n = partitions as usize;
        let mut index: Vec<Vec<(i64, u64)>> = vec![Vec::new(); n];
        let mut last_indexed: Vec<Option<u64>> = vec![None; n];
        let mut next = vec![0i64; n];
        // State as of the end of the last complete append.
        let (mut valid, mut committed_next) = (0u64, next.clone());
        let mut pos = 0u64;
        let mut scratch = Vec::new();
        let damaged = |pos: u64, why: &str| {
            LogError::Corrupt(format!(
                "{}: frame at byte {pos} (before the durable length {checkpoint}): {why}",
                path.display()
            ))
        };
        loop {
            let Some(h) = read_header(&file, &path, pos, file_len)? else {
                break;
            };
            let problem = if h.end() > file_len {
                Some("runs past the end of the file")
            } else if h.len < (FRAME_HEADER_BYTES - 8) as u32 {
                Some("shorter than a header")
            } else if h.partition < 0 || h.partition >= partitions {
                Some("partition out of range")
            } else if h.first_offset != next[h.partition as usize] {
                Some("offsets not consecutive")
            } else if h.end() > checkpoint && !crc_ok(&file, &path, &h, &mut scratch)? {
                Some("crc mismatch")
            } else {
                None
            };
            if let Some(why) = problem {
                if pos < checkpoint {
                    return Err(damaged(pos, why));
                }
                break;
            }
            let p = h.partition as usize;
            next[p] = h.end_offset();
            if last_indexed[p].is_none_or(|at| pos - at >= INDEX_INTERVAL_BYTES) {
                index[p].push((h.first_offset, pos));
                last_indexed[p] = Some(pos);
            }
            pos = h.end();
            if h.flags & LAST_OF_APPEND != 0 {
                valid = pos;
                committed_next.clone_from(&next);
            }
        }
        let next = committed_next;
        if valid < checkpoint {
            return Err(damaged(valid, "the append ending there is incomplete"));
        }
        for entries in &mut index {
            entries.retain(|&(_, at)| at < valid);
        }
        let cut_bytes = file_len - valid;
        if cut_bytes > 0 {
            file.set_len(valid).map_err(io_err(&path, "truncate"))?;
            file.sync_all().map_err(io_err(&path, "fsync"))?;
        }
        Ok(Recovered {
            file: Self::new(path, file, partitions, valid, index),
            next,
            cut_bytes,
        })
    }

    /// Writes the frames of one append after everything written before (not yet durable; see
    /// [`Self::sync`]). On a failed write the file is cut back so the next append starts clean.
    pub(crate) fn write(&self, frames: Vec<FrameBuf>) -> Result<(), LogError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.broken_error());
        }
        let last = frames.len().saturating_sub(1);
        let frames = frames
            .into_iter()
            .enumerate()
            .map(|(i, f)| Ok((f.partition as usize, f.first_offset, f.finish(i == last)?)))
            .collect::<Result<Vec<_>, LogError>>()?;
        let mut w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let start = w.len;
        let indexed_before = w.last_indexed.clone();
        let mut new_index = Vec::new();
        let mut pos = start;
        let mut result = Ok(());
        for (p, first_offset, bytes) in frames {
            if let Err(e) = self.file.write_all_at(&bytes, pos) {
                result = Err(e);
                break;
            }
            if w.last_indexed[p].is_none_or(|at| pos - at >= INDEX_INTERVAL_BYTES) {
                new_index.push((p, first_offset, pos));
                w.last_indexed[p] = Some(pos);
            }
            pos += bytes.len() as u64;
        }
        if let Err(e) = result {
            if self.file.set_len(start).is_err() {
                self.broken.store(true, Ordering::SeqCst);
            }
            // The index entries of this append were never published.
            w.last_indexed = indexed_before;
            return Err(io_err(&self.path, "write")(e));
        }
        w.len = pos;
        drop(w);
        if !new_index.is_empty() {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            for (p, first, at) in new_index {
                index[p].push((first, at));
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (one `fdatasync`, which also covers appends of
    /// other writers) and lets readers see it. Returns the durable length.
    pub(crate) async fn sync(&self) -> Result<u64, LogError> {
        // Every byte below this length is written before the fsync starts.
        let len = self
            .write
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len;
        let file = Arc::clone(&self.file);
        let synced = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| LogError::Closed(format!("fsync task: {e}")))?;
        if let Err(e) = synced {
            // After a failed fsync the kernel may have dropped the dirty pages: what is on disk
            // is unknown until the file is read again.
            self.broken.store(true, Ordering::SeqCst);
            return Err(io_err(&self.path, "fsync")(e));
        }
        self.durable_len.fetch_max(len, Ordering::SeqCst);
        Ok(len)
    }

    fn broken_error(&self) -> LogError {
        LogError::File {
            path: self.path.clone(),
            op: "append after an earlier write or fsync failed (restart to recover the file)",
            source: std::io::Error::other("file state unknown"),
        }
    }

    /// Bytes readers may read.
    pub(crate) fn durable_len(&self) -> u64 {
        self.durable_len.load(Ordering::SeqCst)
    }

    /// A frame position at or before the first frame of `partition` holding `offset` or later.
    pub(crate) fn seek(&self, partition: i32, offset: i64) -> u64 {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let entries = &index[partition as usize];
        match entries.partition_point(|&(first, _)| first <= offset) {
            0 => 0,
            i => entries[i - 1].1,
        }
    }

    /// The header of the frame at `pos` (which must be below [`Self::durable_len`]).
    pub(crate) fn header_at(&self, pos: u64) -> Result<FrameHeader, LogError> {
        read_header(&self.file, &self.path, pos, self.durable_len())?.ok_or_else(|| {
            LogError::Corrupt(format!(
                "{}: no frame header at byte {pos}",
                self.path.display()
            ))
        })
    }

    /// The segment of the frame `h`, crc-checked, into `buf`.
    pub(crate) fn segment<'a>(
        &self,
        h: &FrameHeader,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], LogError> {
        if !crc_ok(&self.file, &self.path, h, buf)? {
            return Err(LogError::Corrupt(format!(
                "{}: crc mismatch in the frame at byte {}",
                self.path.display(),
                h.pos
            )));
        }
        Ok(&buf[FRAME_HEADER_BYTES - 8..])
    }
}

/// The header at `pos`, or `None` when fewer than a header's bytes remain before `limit`.
fn read_header(
    file: &File,
    path: &Path,
    pos: u64,
    limit: u64,
) -> Result<Option<FrameHeader>, LogError> {
    if pos + FRAME_HEADER_BYTES as u64 > limit {
        return Ok(None);
    }
    let mut b = [0u8; FRAME_HEADER_BYTES];
    file.read_exact_at(&mut b, pos)
        .map_err(io_err(path, "read"))?;
    Ok(Some(FrameHeader::parse(pos, &b)))
}

/// Reads the frame's bytes after the crc into `buf` and checks them.
fn crc_ok(file: &File, path: &Path, h: &FrameHeader, buf: &mut Vec<u8>) -> Result<bool, LogError> {
    buf.clear();
    buf.resize(h.len as usize, 0);
    file.read_exact_at(buf, h.pos + 8)
        .map_err(io_err(path, "read"))?;
    Ok(crc32fast::hash(buf) == h.crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(p: i32, first: i64, values: &[&str]) -> FrameBuf {
        let mut f = FrameBuf::new(p, first);
        for v in values {
            f.push(&Record::new("k", *v)).unwrap();
        }
        f
    }

    /// Writes one append; the file length after it.
    fn written(tf: &TopicFile, frames: Vec<FrameBuf>) -> u64 {
        tf.write(frames).unwrap();
        tf.write.lock().unwrap().len
    }

    fn values(tf: &TopicFile, h: &FrameHeader) -> Vec<String> {
        let mut buf = Vec::new();
        let seg = tf.segment(h, &mut buf).unwrap();
        codec::split_segment(seg)
            .unwrap()
            .iter()
            .map(|b| String::from_utf8(codec::decode(b).unwrap().value.unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn frames_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let tf = TopicFile::create(dir.path(), "t", 2).unwrap();
        let len = written(&tf, vec![frame(0, 0, &["a", "b"]), frame(1, 0, &["c"])]);
        assert_eq!(tf.sync().await.unwrap(), len);
        let len = written(&tf, vec![frame(0, 2, &["d"])]);
        tf.sync().await.unwrap();
        assert_eq!(tf.durable_len(), len);

        let h0 = tf.header_at(0).unwrap();
        assert_eq!((h0.partition, h0.first_offset, h0.count), (0, 0, 2));
        assert_eq!(values(&tf, &h0), ["a", "b"]);
        let h1 = tf.header_at(h0.end()).unwrap();
        assert_eq!(values(&tf, &h1), ["c"]);
        assert_eq!(
            tf.seek(0, 2),
            0,
            "sparse index: the partition's first frame"
        );
        drop(tf);

        let r = TopicFile::open(dir.path(), "t", 2, 0).unwrap();
        assert_eq!(r.next, [3, 1]);
        assert_eq!(r.cut_bytes, 0);
        assert_eq!(r.file.durable_len(), len);
    }

    #[tokio::test]
    async fn a_torn_append_is_cut_whole() {
        let dir = tempfile::tempdir().unwrap();
        let tf = TopicFile::create(dir.path(), "t", 2).unwrap();
        let first = written(&tf, vec![frame(0, 0, &["a"])]);
        tf.sync().await.unwrap();
        // An append of two frames whose second frame is torn: the first must go too.
        let end = written(&tf, vec![frame(1, 0, &["b"]), frame(0, 1, &["c", "d"])]);
        drop(tf);
        let path = TopicFile::path_in(dir.path(), "t");
        for cut in [end - 1, end - 10, first + 30, first + 1] {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let r = TopicFile::open(dir.path(), "t", 2, first).unwrap();
            assert_eq!(r.next, [1, 0], "cut at {cut}");
            assert_eq!(r.cut_bytes, cut - first);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), first);
        }
    }

    fn flip_byte(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    }

    #[tokio::test]
    async fn damage_before_the_checkpoint_is_an_error_and_after_it_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let tf = TopicFile::create(dir.path(), "t", 1).unwrap();
        let a = written(&tf, vec![frame(0, 0, &["a"])]);
        let b = written(&tf, vec![frame(0, 1, &["b"])]);
        tf.sync().await.unwrap();
        drop(tf);
        let path = TopicFile::path_in(dir.path(), "t");
        // Damage the second frame's record.
        flip_byte(&path, b - 1);

        // Acknowledged frames are not crc-checked on open (only their headers are walked), but
        // reading the damaged one is a clear error, never a wrong record.
        let r = TopicFile::open(dir.path(), "t", 1, b).unwrap();
        let h = r.file.header_at(a).unwrap();
        let err = r.file.segment(&h, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(&err, LogError::Corrupt(m) if m.contains("crc mismatch") && m.contains(&format!("byte {a}"))),
            "{err}"
        );
        drop(r);
        // The same damage past the checkpoint is a torn tail: cut, nothing acknowledged lost.
        let r = TopicFile::open(dir.path(), "t", 1, a).unwrap();
        assert_eq!((r.next.as_slice(), r.cut_bytes), ([1].as_slice(), b - a));
        drop(r);
        // Now shorter than what was acknowledged.
        let err = TopicFile::open(dir.path(), "t", 1, b).unwrap_err();
        assert!(err.to_string().contains("acknowledged as durable"), "{err}");

        // A damaged header before the checkpoint (here: the first offset) stops the open.
        let tf = TopicFile::open(dir.path(), "t", 1, a).unwrap().file;
        let b = written(&tf, vec![frame(0, 1, &["b"])]);
        tf.sync().await.unwrap();
        drop(tf);
        flip_byte(&path, a + 20);
        let err = TopicFile::open(dir.path(), "t", 1, b).unwrap_err();
        assert!(
            matches!(&err, LogError::Corrupt(m) if m.contains("offsets not consecutive") && m.contains(&format!("byte {a}"))),
            "{err}"
        );
    }

    #[tokio::test]
    async fn seek_uses_the_sparse_index() {
        let dir = tempfile::tempdir().unwrap();
        let tf = TopicFile::create(dir.path(), "t", 2).unwrap();
        let big = "x".repeat(20_000);
        let mut len = 0;
        for i in 0..20 {
            len = written(&tf, vec![frame(0, i, &[&big]), frame(1, i, &["small"])]);
        }
        tf.sync().await.unwrap();
        for p in 0..2 {
            for offset in 0..20 {
                let at = tf.seek(p, offset);
                // Walking forward from `at` reaches the frame holding `offset`, never passes it.
                let mut pos = at;
                loop {
                    let h = tf.header_at(pos).unwrap();
                    if h.partition == p {
                        assert!(h.first_offset <= offset, "seek went past {p}/{offset}");
                        if h.end_offset() > offset {
                            break;
                        }
                    }
                    pos = h.end();
                }
            }
        }
        let index = tf.index.read().unwrap().clone();
        assert!(index[0].len() > 1 && index[0].len() < 20, "{:?}", index[0]);
        drop(tf);
        let r = TopicFile::open(dir.path(), "t", 2, len).unwrap();
        assert_eq!(r.next, [20, 20]);
        assert_eq!(
            *r.file.index.read().unwrap(),
            index,
            "rebuilt the same index"
        );
    }
}
