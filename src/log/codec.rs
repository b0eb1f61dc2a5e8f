//! Binary encoding of records in the embedded log (versioned, length-prefixed, big-endian).
//!
//! `v1 = [1][timestamp i64][key_len u32][key][has_value u8]([value_len u32][value])?
//!       [header_count u32]([name_len u32][name utf-8][value_len u32][value])*`
//!
//! A segment (several consecutive records of one partition, the body of one topic-file frame) is
//! `[SEGMENT_VERSION][count u32]([record_len u32][v1 record])*`.

use super::{LogError, Record};

const VERSION: u8 = 1;
const SEGMENT_VERSION: u8 = 1;

/// Builds one segment out of consecutive records, encoding each straight into the buffer.
#[derive(Debug)]
pub(crate) struct SegmentBuf {
    buf: Vec<u8>,
    /// Where the segment starts in `buf` (after room the caller reserved for its own header).
    start: usize,
    count: u32,
}

impl SegmentBuf {
    /// A segment that starts after `reserved` zero bytes (a header the caller fills in later).
    pub(crate) fn with_reserved(reserved: usize, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(reserved + capacity);
        buf.resize(reserved, 0);
        buf.push(SEGMENT_VERSION);
        buf.extend_from_slice(&0u32.to_be_bytes());
        Self {
            buf,
            start: reserved,
            count: 0,
        }
    }

    /// Encoded size of the segment so far (without the reserved bytes).
    pub(crate) fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Records pushed so far.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn push(&mut self, r: &Record) -> Result<(), LogError> {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let len = encode_into(&mut self.buf, r).and_then(|()| {
            let len = self.buf.len() - at - 4;
            u32::try_from(len).map_err(|_| {
                LogError::InvalidArgument(format!("record of {len} bytes is too large"))
            })
        });
        let len = match len {
            Ok(len) => len,
            Err(e) => {
                // Leave the segment as it was: the record is not in it.
                self.buf.truncate(at);
                return Err(e);
            }
        };
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        self.count += 1;
        Ok(())
    }

    /// The reserved bytes followed by the segment.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let at = self.start + 1;
        self.buf[at..at + 4].copy_from_slice(&self.count.to_be_bytes());
        self.buf
    }
}

/// The encoded records of a segment, in offset order (each still to be [`decode`]d).
pub(crate) fn split_segment(buf: &[u8]) -> Result<Vec<&[u8]>, LogError> {
    let mut rd = Reader { buf };
    let version = rd.u8()?;
    if version != SEGMENT_VERSION {
        return Err(LogError::Corrupt(format!(
            "unknown segment encoding version {version}"
        )));
    }
    let count = rd.len()?;
    // Each record takes at least 4 bytes, so a corrupt count cannot make us allocate wildly.
    let mut out = Vec::with_capacity(count.min(rd.buf.len() / 4));
    for _ in 0..count {
        out.push(rd.bytes()?);
    }
    if !rd.buf.is_empty() {
        return Err(LogError::Corrupt(format!(
            "{} trailing bytes after segment",
            rd.buf.len()
        )));
    }
    Ok(out)
}

pub(crate) fn encode(r: &Record) -> Result<Vec<u8>, LogError> {
    let headers_len: usize = r.headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
    let mut out = Vec::with_capacity(
        1 + 8 + 4 + r.key.len() + 1 + 4 + r.value.as_ref().map_or(0, Vec::len) + 4 + headers_len,
    );
    encode_into(&mut out, r)?;
    Ok(out)
}

/// Appends the v1 encoding of `r` to `out`.
pub(crate) fn encode_into(out: &mut Vec<u8>, r: &Record) -> Result<(), LogError> {
    out.push(VERSION);
    out.extend_from_slice(&r.timestamp_ms.to_be_bytes());
    put_bytes(out, &r.key)?;
    match &r.value {
        Some(v) => {
            out.push(1);
            put_bytes(out, v)?;
        }
        None => out.push(0),
    }
    put_len(out, r.headers.len())?;
    for (name, value) in &r.headers {
        put_bytes(out, name.as_bytes())?;
        put_bytes(out, value)?;
    }
    Ok(())
}

pub(crate) fn decode(buf: &[u8]) -> Result<Record, LogError> {
    let mut rd = Reader { buf };
    let version = rd.u8()?;
    if version != VERSION {
        return Err(LogError::Corrupt(format!(
            "unknown record encoding version {version}"
        )));
    }
    let timestamp_ms = i64::from_be_bytes(rd.array()?);
    let key = rd.bytes()?.to_vec();
    let value = match rd.u8()? {
        0 => None,
        1 => Some(rd.bytes()?.to_vec()),
        other => return Err(LogError::Corrupt(format!("bad value flag {other}"))),
    };
    let count = rd.len()?;
    // Each header takes at least 8 bytes, so a corrupt count cannot make us allocate wildly.
    let mut headers = Vec::with_capacity(count.min(rd.buf.len() / 8));
    for _ in 0..count {
        let name = String::from_utf8(rd.bytes()?.to_vec())
            .map_err(|e| LogError::Corrupt(format!("header name not utf-8: {e}")))?;
        let value = rd.bytes()?.to_vec();
        headers.push((name, value));
    }
    if !rd.buf.is_empty() {
        return Err(LogError::Corrupt(format!(
            "{} trailing bytes after record",
            rd.buf.len()
        )));
    }
    Ok(Record {
        key,
        value,
        headers,
        timestamp_ms,
    })
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), LogError> {
    let len = u32::try_from(len)
        .map_err(|_| LogError::InvalidArgument(format!("field of {len} bytes is too large")))?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), LogError> {
    put_len(out, b.len())?;
    out.extend_from_slice(b);
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LogError> {
        if self.buf.len() < n {
            return Err(LogError::Corrupt(format!(
                "record truncated: need {n} bytes, have {}",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], LogError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, LogError> {
        Ok(self.take(1)?[0])
    }

    fn len(&mut self) -> Result<usize, LogError> {
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], LogError> {
        let n = self.len()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let records = [
            Record::new("k", "v")
                .with_header("a", "1")
                .with_header("a", ""),
            Record::tombstone(""),
            Record::new(vec![0u8, 255], Vec::new()).with_timestamp_ms(-5),
        ];
        for r in records {
            let enc = encode(&r).unwrap();
            assert_eq!(decode(&enc).unwrap(), r);
            // Every strict prefix is detected as corrupt, never mis-decoded.
            for cut in 0..enc.len() {
                assert!(decode(&enc[..cut]).is_err());
            }
        }
    }

    #[test]
    fn segment_round_trip() {
        let records = [
            Record::new("k", "v").with_header("h", "1"),
            Record::tombstone("gone"),
            Record::new("", ""),
        ];
        let mut seg = SegmentBuf::with_reserved(3, 64);
        for r in &records {
            seg.push(r).unwrap();
        }
        assert_eq!(seg.count(), 3);
        let enc = seg.finish();
        assert_eq!(enc[..3], [0, 0, 0]);
        let enc = &enc[3..];
        let parts = split_segment(enc).unwrap();
        assert_eq!(parts.len(), 3);
        let decoded: Vec<Record> = parts.iter().map(|b| decode(b).unwrap()).collect();
        assert_eq!(decoded, records);
        for cut in 0..enc.len() {
            assert!(split_segment(&enc[..cut]).is_err(), "prefix of {cut} bytes");
        }
        assert!(
            split_segment(&SegmentBuf::with_reserved(0, 8).finish())
                .unwrap()
                .is_empty()
        );
    }
}
