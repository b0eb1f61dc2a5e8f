//! PostgreSQL text output form → Avro binary, one scalar type at a time, written straight into the
//! output buffer (no intermediate `apache_avro::types::Value`: this is the per-event hot path).
//!
//! Assumes the server's default output settings for the replication session: `DateStyle = ISO`,
//! `bytea_output = hex` (the escape form is accepted too), `extra_float_digits >= 1` (PostgreSQL
//! 12+ default: shortest exact float output).
//!
//! Every converter returns:
//! - `Ok(Written::Value)`: the value was written in the column's Avro type;
//! - `Ok(Written::Unrepresentable)`: valid PostgreSQL text that the Avro logical type cannot hold
//!   (`infinity` dates/timestamps, numeric `NaN`/`±Infinity`, multi-dimensional arrays...). Nothing
//!   was written; the caller writes the field's `string` branch with the text instead (lossless);
//! - `Err(reason)`: the text is not a value of the column's type (a data problem, never a panic).

/// Outcome of writing one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Value,
    Unrepresentable,
}

pub(crate) type ConvResult = Result<Written, String>;

/// The Avro shape a PostgreSQL scalar type maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scalar {
    Bool,
    Int,
    Long,
    Float,
    Double,
    /// Avro `bytes` + `decimal`; `precision`/`scale` are the Avro ones (see `schema::numeric_avro`).
    Decimal {
        precision: u32,
        scale: u32,
    },
    String,
    /// json/jsonb: a string, tagged `io.debezium.data.Json` in the schema.
    Json,
    Uuid,
    Bytes,
    Date,
    Time,
    Timestamp,
    TimestampTz,
}

impl Scalar {
    /// Whether some valid PostgreSQL values of this type need the `string` fallback branch.
    pub(crate) fn has_special(&self) -> bool {
        matches!(
            self,
            Scalar::Decimal { .. } | Scalar::Date | Scalar::Timestamp | Scalar::TimestampTz
        )
    }

    /// Writes `text` as this type's Avro binary.
    pub(crate) fn write(&self, text: &str, out: &mut Vec<u8>) -> ConvResult {
        match self {
            Scalar::Bool => {
                let b = match text {
                    "t" | "true" => true,
                    "f" | "false" => false,
                    _ => return Err("not a boolean".into()),
                };
                out.push(u8::from(b));
            }
            Scalar::Int => {
                let v: i32 = parse_int(text)?;
                write_long(out, i64::from(v));
            }
            Scalar::Long => {
                let v: i64 = parse_int(text)?;
                write_long(out, v);
            }
            Scalar::Float => out.extend_from_slice(&parse_f32(text)?.to_le_bytes()),
            Scalar::Double => out.extend_from_slice(&parse_f64(text)?.to_le_bytes()),
            Scalar::Decimal { precision, scale } => {
                return write_decimal(text, *precision, *scale, out);
            }
            Scalar::String | Scalar::Json => write_bytes(out, text.as_bytes()),
            Scalar::Uuid => {
                // PostgreSQL prints the canonical hyphenated form; anything else is not a uuid
                // value (and consumers' uuid logical type would reject it).
                if text.len() != 36 || uuid::Uuid::try_parse(text).is_err() {
                    return Err("not a uuid".into());
                }
                write_bytes(out, text.as_bytes());
            }
            Scalar::Bytes => {
                let bytes = parse_bytea(text)?;
                write_bytes(out, &bytes);
            }
            Scalar::Date => match parse_date(text)? {
                Some(days) => match i32::try_from(days) {
                    Ok(d) => write_long(out, i64::from(d)),
                    Err(_) => return Ok(Written::Unrepresentable),
                },
                None => return Ok(Written::Unrepresentable),
            },
            Scalar::Time => write_long(out, parse_time(text)?),
            Scalar::Timestamp => match parse_timestamp(text, false)? {
                Some(us) => write_long(out, us),
                None => return Ok(Written::Unrepresentable),
            },
            Scalar::TimestampTz => match parse_timestamp(text, true)? {
                Some(us) => write_long(out, us),
                None => return Ok(Written::Unrepresentable),
            },
        }
        Ok(Written::Value)
    }
}

// ---------------------------------------------------------------- Avro binary primitives

/// Avro `long`/`int`: zigzag then base-128 varint (an `int` is the same bytes as its `long`).
pub(crate) fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

pub(crate) fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // A Rust slice is at most isize::MAX bytes, so the length always fits an i64.
    write_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

// ---------------------------------------------------------------- numbers

fn parse_int<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse::<T>()
        .map_err(|_| "not an integer in range".to_string())
}

/// PostgreSQL spells the specials `NaN`, `Infinity`, `-Infinity`; Rust's parser spells them
/// differently and also accepts forms PostgreSQL never prints (`inf`), which is harmless.
fn float_special(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

fn parse_f32(text: &str) -> Result<f32, String> {
    if let Some(v) = float_special(text) {
        return Ok(v as f32);
    }
    // Parse directly as f32 (not via f64) so there is no double rounding.
    text.parse::<f32>().map_err(|_| "not a float4".to_string())
}

fn parse_f64(text: &str) -> Result<f64, String> {
    if let Some(v) = float_special(text) {
        return Ok(v);
    }
    text.parse::<f64>().map_err(|_| "not a float8".to_string())
}

/// numeric text (`-123.4500`, `NaN`, `Infinity`) → Avro decimal bytes with the schema's scale.
fn write_decimal(text: &str, precision: u32, scale: u32, out: &mut Vec<u8>) -> ConvResult {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(Written::Unrepresentable);
    }
    let (neg, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (int_part, frac_part) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return Err("not a numeric".into());
    }
    let scale = scale as usize;
    let mut digits: Vec<u8> = Vec::with_capacity(int_part.len() + scale);
    digits.extend_from_slice(int_part.as_bytes());
    if frac_part.len() > scale {
        // More fractional digits than the column's scale: only trailing zeros can be dropped.
        let (kept, extra) = frac_part.split_at(scale);
        if extra.bytes().any(|b| b != b'0') {
            return Ok(Written::Unrepresentable);
        }
        digits.extend_from_slice(kept.as_bytes());
    } else {
        digits.extend_from_slice(frac_part.as_bytes());
        digits.resize(int_part.len() + scale, b'0');
    }
    let first_nonzero = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    let significant = &digits[first_nonzero..];
    if significant.len() > precision as usize {
        return Ok(Written::Unrepresentable);
    }
    let bytes = digits_to_twos_complement(neg, significant);
    write_bytes(out, &bytes);
    Ok(Written::Value)
}

/// Decimal digits (ASCII, no sign) → minimal big-endian two's complement (Avro decimal bytes).
pub(crate) fn digits_to_twos_complement(neg: bool, digits: &[u8]) -> Vec<u8> {
    // Little-endian base-2^32 limbs; schoolbook multiply-add, 9 decimal digits per step.
    let mut limbs: Vec<u32> = Vec::with_capacity(digits.len() / 9 + 1);
    for chunk in digits.chunks(9) {
        let mut mul: u64 = 1;
        let mut add: u64 = 0;
        for &d in chunk {
            mul *= 10;
            add = add * 10 + u64::from(d.wrapping_sub(b'0') % 10);
        }
        let mut carry = add;
        for limb in limbs.iter_mut() {
            let v = u64::from(*limb) * mul + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry > 0 {
            limbs.push(carry as u32);
        }
    }
    let mut mag: Vec<u8> = Vec::with_capacity(limbs.len() * 4 + 1);
    mag.push(0); // room for the sign bit
    for limb in limbs.iter().rev() {
        mag.extend_from_slice(&limb.to_be_bytes());
    }
    let is_zero = mag.iter().all(|&b| b == 0);
    if neg && !is_zero {
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
    }
    // Minimal form: drop a leading 0x00/0xFF byte while the next byte carries the same sign.
    let mut start = 0;
    while start + 1 < mag.len() {
        let (b, next) = (mag[start], mag[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    mag.split_off(start)
}

/// Avro decimal bytes (big-endian two's complement unscaled value) + scale → decimal text, e.g.
/// `[0xFB, 0x2E]`, scale 2 → `-12.34`. For consumers and tests; never panics.
pub fn decimal_to_string(unscaled: &[u8], scale: usize) -> String {
    let neg = unscaled.first().is_some_and(|&b| b & 0x80 != 0);
    let mut mag: Vec<u8> = unscaled.to_vec();
    if neg {
        // Magnitude = two's complement negation.
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
    }
    // Big-endian bytes → base 10^9 digits by repeated division.
    let mut chunks: Vec<u32> = Vec::new();
    let mut num: Vec<u8> = mag;
    while num.iter().any(|&b| b != 0) {
        let mut rem: u64 = 0;
        for b in num.iter_mut() {
            let cur = (rem << 8) | u64::from(*b);
            *b = (cur / 1_000_000_000) as u8;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
        let nz = num.iter().position(|&b| b != 0).unwrap_or(num.len());
        num.drain(..nz);
    }
    let mut digits = String::new();
    for (i, c) in chunks.iter().rev().enumerate() {
        if i == 0 {
            digits.push_str(&c.to_string());
        } else {
            digits.push_str(&format!("{c:09}"));
        }
    }
    if digits.is_empty() {
        digits.push('0');
    }
    if digits.len() <= scale {
        digits = format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits);
    }
    let mut s = String::with_capacity(digits.len() + 2);
    if neg {
        s.push('-');
    }
    let split = digits.len() - scale;
    s.push_str(&digits[..split]);
    if scale > 0 {
        s.push('.');
        s.push_str(&digits[split..]);
    }
    s
}

// ---------------------------------------------------------------- bytea

fn parse_bytea(text: &str) -> Result<Vec<u8>, String> {
    if let Some(hex_digits) = text.strip_prefix("\\x") {
        return hex::decode(hex_digits).map_err(|_| "bad bytea hex".to_string());
    }
    // Escape format (bytea_output = escape): `\\` and `\ooo` octal escapes, other bytes literal.
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b.get(i + 1..i + 4).ok_or("bad bytea escape")?;
            if !oct.iter().all(|c| (b'0'..=b'7').contains(c)) || oct[0] > b'3' {
                return Err("bad bytea escape".into());
            }
            out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
            i += 4;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- dates and times

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year: 1 BC = 0).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`]: (astronomical year, month, day).
#[cfg(test)]
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn digits_value(s: &str, min_len: usize, max_len: usize) -> Result<i64, String> {
    if s.len() < min_len || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad number field {s:?}"));
    }
    s.parse::<i64>().map_err(|_| "bad number field".to_string())
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// `YYYY-MM-DD` (year ≥ 4 digits) → days since epoch; `bc` flips to astronomical year.
fn parse_ymd(s: &str, bc: bool) -> Result<i64, String> {
    let mut it = s.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (it.next(), it.next(), it.next()) else {
        return Err("bad date".into());
    };
    let y = digits_value(y, 1, 9)?;
    let m = digits_value(m, 2, 2)?;
    let d = digits_value(d, 2, 2)?;
    if y == 0 {
        return Err("year 0 does not exist".into());
    }
    let year = if bc { 1 - y } else { y };
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => return Err("bad month".into()),
    };
    if d < 1 || d > days_in_month {
        return Err("bad day".into());
    }
    Ok(days_from_civil(year, m, d))
}

fn strip_bc(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    }
}

/// Date → days since epoch; `None` for `infinity`/`-infinity`.
fn parse_date(text: &str) -> Result<Option<i64>, String> {
    if matches!(text, "infinity" | "-infinity") {
        return Ok(None);
    }
    let (s, bc) = strip_bc(text);
    parse_ymd(s, bc).map(Some)
}

/// `HH:MM:SS[.ffffff]` → microseconds after midnight (`24:00:00` is a valid PostgreSQL time).
fn parse_time(s: &str) -> Result<i64, String> {
    let (hms, frac) = match s.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (s, None),
    };
    let mut it = hms.splitn(3, ':');
    let (Some(h), Some(m), Some(sec)) = (it.next(), it.next(), it.next()) else {
        return Err("bad time".into());
    };
    let (h, m, sec) = (
        digits_value(h, 2, 2)?,
        digits_value(m, 2, 2)?,
        digits_value(sec, 2, 2)?,
    );
    let micros = match frac {
        Some(f) => digits_value(f, 1, 6)? * 10_i64.pow(6 - f.len() as u32),
        None => 0,
    };
    if h > 24 || m > 59 || sec > 60 || (h == 24 && (m, sec, micros) != (0, 0, 0)) {
        return Err("time out of range".into());
    }
    Ok(((h * 60 + m) * 60 + sec) * 1_000_000 + micros)
}

/// `[+-]HH[:MM[:SS]]` → offset seconds east of UTC.
fn parse_offset(s: &str) -> Result<i64, String> {
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err("bad utc offset".into()),
    };
    let mut secs = 0;
    let mut parts = 0;
    for (i, p) in rest.split(':').enumerate() {
        if i > 2 {
            return Err("bad utc offset".into());
        }
        secs = secs * 60 + digits_value(p, 2, 2)?;
        parts = i + 1;
    }
    // Normalise `+HH` / `+HH:MM` to seconds.
    for _ in parts..3 {
        secs *= 60;
    }
    Ok(sign * secs)
}

/// timestamp[tz] text → microseconds since the epoch (UTC for tz); `None` for ±infinity and
/// instants beyond i64 microseconds.
/// Forms: `2024-01-02 03:04:05[.ffffff][+HH[:MM[:SS]]][ BC]`.
fn parse_timestamp(text: &str, with_tz: bool) -> Result<Option<i64>, String> {
    if matches!(text, "infinity" | "-infinity") {
        return Ok(None);
    }
    let (s, bc) = strip_bc(text);
    let (date, rest) = s.split_once(' ').ok_or("bad timestamp")?;
    let days = parse_ymd(date, bc)?;
    let (time, offset_s) = if with_tz {
        let at = rest.find(['+', '-']).ok_or("timestamptz without offset")?;
        (&rest[..at], parse_offset(&rest[at..])?)
    } else {
        (rest, 0)
    };
    let micros = parse_time(time)?;
    // PostgreSQL counts from 2000-01-01, so its last ~2000 years of timestamps (after about
    // 294247 AD) do not fit in i64 micros since 1970: unrepresentable, not invalid.
    let us =
        i128::from(days) * 86_400_000_000 + i128::from(micros) - i128::from(offset_s) * 1_000_000;
    Ok(i64::try_from(us).ok())
}

// ---------------------------------------------------------------- arrays

/// Elements of a one-dimensional PostgreSQL array literal (`{1,"a b",NULL}`); `None` elements are
/// SQL NULLs. `Ok(None)` when the literal is valid but not one-dimensional with default bounds
/// (`{{1,2},{3,4}}`, `[0:1]={1,2}`): the caller falls back to the text.
pub(crate) fn parse_array(text: &str) -> Result<Option<Vec<Option<String>>>, String> {
    if text.starts_with('[') {
        return Ok(None);
    }
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or("not an array literal")?;
    let b = inner.as_bytes();
    let mut out = Vec::new();
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(out));
    }
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut elem: Vec<u8> = Vec::new();
        let mut quoted = false;
        let mut escaped_any = false;
        match b.get(i) {
            Some(b'{') => return Ok(None),
            Some(b'"') => {
                quoted = true;
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err("unterminated quoted array element".into()),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let c = b.get(i + 1).ok_or("dangling backslash")?;
                            elem.push(*c);
                            i += 2;
                        }
                        Some(c) => {
                            elem.push(*c);
                            i += 1;
                        }
                    }
                }
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
            }
            _ => {
                while let Some(&c) = b.get(i) {
                    match c {
                        b',' => break,
                        b'{' | b'}' | b'"' => return Err("unexpected character in array".into()),
                        b'\\' => {
                            let c = b.get(i + 1).ok_or("dangling backslash")?;
                            elem.push(*c);
                            escaped_any = true;
                            i += 2;
                        }
                        c => {
                            elem.push(c);
                            i += 1;
                        }
                    }
                }
                if !escaped_any {
                    while elem.last().is_some_and(u8::is_ascii_whitespace) {
                        elem.pop();
                    }
                }
                if elem.is_empty() {
                    return Err("empty unquoted array element".into());
                }
            }
        }
        // Only ASCII bytes were removed from / added around UTF-8 input, so this cannot fail;
        // still, a failure is a data error, not a panic.
        let s = String::from_utf8(elem).map_err(|_| "invalid utf-8 in array element")?;
        if !quoted && !escaped_any && s.eq_ignore_ascii_case("NULL") {
            out.push(None);
        } else {
            out.push(Some(s));
        }
        match b.get(i) {
            None => return Ok(Some(out)),
            Some(b',') => i += 1,
            Some(_) => return Err("expected ',' in array".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_bytes(v: i64) -> Vec<u8> {
        let mut o = Vec::new();
        write_long(&mut o, v);
        o
    }

    #[test]
    fn zigzag_matches_spec_examples() {
        assert_eq!(long_bytes(0), [0x00]);
        assert_eq!(long_bytes(-1), [0x01]);
        assert_eq!(long_bytes(1), [0x02]);
        assert_eq!(long_bytes(-64), [0x7f]);
        assert_eq!(long_bytes(64), [0x80, 0x01]);
        assert_eq!(long_bytes(i64::MIN).len(), 10);
    }

    #[test]
    fn twos_complement_minimal() {
        let t = |n: bool, d: &str| digits_to_twos_complement(n, d.as_bytes());
        assert_eq!(t(false, "0"), [0x00]);
        assert_eq!(t(true, "0"), [0x00]);
        assert_eq!(t(false, "127"), [0x7f]);
        assert_eq!(t(false, "128"), [0x00, 0x80]);
        assert_eq!(t(true, "128"), [0x80]);
        assert_eq!(t(true, "129"), [0xff, 0x7f]);
        assert_eq!(t(true, "1"), [0xff]);
        assert_eq!(t(false, "4294967296"), [0x01, 0, 0, 0, 0]);
        assert_eq!(decimal_to_string(&[0xfb, 0x2e], 2), "-12.34");
        assert_eq!(decimal_to_string(&[0x00], 3), "0.000");
        assert_eq!(decimal_to_string(&[0xff], 3), "-0.001");
        assert_eq!(decimal_to_string(&[], 0), "0");
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-01"), Ok(Some(0)));
        assert_eq!(parse_date("2000-03-01"), Ok(Some(11_017)));
        assert_eq!(parse_date("1969-12-31"), Ok(Some(-1)));
        // 1 BC is astronomical year 0 (a leap year); 0001-01-01 is 1 day after 0001-12-31 BC.
        assert_eq!(
            parse_date("0001-01-01").unwrap().unwrap() - 1,
            parse_date("0001-12-31 BC").unwrap().unwrap()
        );
        assert!(parse_date("0001-02-29 BC").is_ok());
        assert!(parse_date("0001-02-29").is_err());
        assert_eq!(parse_date("infinity"), Ok(None));
        assert_eq!(parse_date("-infinity"), Ok(None));
        assert!(parse_date("0000-01-01").is_err());
        assert!(parse_date("2024-13-01").is_err());
        assert!(parse_date("2024-02-30").is_err());
        assert!(parse_date("01/02/2024").is_err());
        // PostgreSQL's max date fits an Avro int.
        assert!(i32::try_from(parse_date("5874897-12-31").unwrap().unwrap()).is_ok());
        assert_eq!(parse_date("4714-11-24 BC").unwrap().unwrap(), -2_440_588);
    }

    #[test]
    fn times_and_timestamps() {
        assert_eq!(parse_time("00:00:00"), Ok(0));
        assert_eq!(parse_time("24:00:00"), Ok(86_400_000_000));
        assert_eq!(parse_time("03:04:05.5"), Ok(11_045_500_000));
        assert_eq!(parse_time("03:04:05.000001"), Ok(11_045_000_001));
        assert!(parse_time("24:00:01").is_err());
        assert!(parse_time("03:04:05.1234567").is_err());
        assert!(parse_time("3:04:05").is_err());
        let ts = |s| parse_timestamp(s, false);
        let tz = |s| parse_timestamp(s, true);
        assert_eq!(ts("1970-01-01 00:00:00"), Ok(Some(0)));
        assert_eq!(ts("1970-01-01 00:00:00.000001"), Ok(Some(1)));
        assert_eq!(ts("1969-12-31 23:59:59.999999"), Ok(Some(-1)));
        assert_eq!(ts("infinity"), Ok(None));
        assert_eq!(tz("-infinity"), Ok(None));
        let base = 1_704_164_645_123_456; // 2024-01-02 03:04:05.123456 UTC
        assert_eq!(tz("2024-01-02 03:04:05.123456+00"), Ok(Some(base)));
        assert_eq!(
            tz("2024-01-02 04:04:05.123456+01"),
            Ok(Some(base)),
            "+01 is one hour ahead of UTC"
        );
        assert_eq!(tz("2024-01-02 08:34:05.123456+05:30"), Ok(Some(base)));
        assert_eq!(tz("2024-01-01 23:04:05.123456-04"), Ok(Some(base)));
        assert_eq!(
            tz("2024-01-02 03:04:20.123456+00:00:15"),
            Ok(Some(base)),
            "LMT offsets carry seconds"
        );
        // BC comes after the offset in PostgreSQL's output.
        let bc = tz("0044-03-15 12:00:00+00 BC").unwrap().unwrap();
        assert_eq!(
            bc,
            (parse_date("0044-03-15 BC").unwrap().unwrap() * 86_400 + 43_200) * 1_000_000
        );
        assert!(tz("2024-01-02 03:04:05").is_err(), "offset is required");
        assert!(ts("2024-01-02T03:04:05").is_err());
        assert!(tz("2024-01-02 03:04:05+5").is_err());
        // The end of PostgreSQL's timestamp range does not fit in i64 micros since 1970.
        assert!(ts("294246-12-31 23:59:59.999999").unwrap().is_some());
        assert_eq!(ts("294276-12-31 23:59:59.999999"), Ok(None));
        assert!(ts("4713-01-01 00:00:00 BC").unwrap().is_some());
    }

    #[test]
    fn bytea_forms() {
        assert_eq!(parse_bytea("\\x"), Ok(vec![]));
        assert_eq!(parse_bytea("\\xDEadBE00"), Ok(vec![0xde, 0xad, 0xbe, 0x00]));
        assert!(parse_bytea("\\x0").is_err());
        assert_eq!(
            parse_bytea("a\\\\b\\000\\377"),
            Ok(vec![b'a', b'\\', b'b', 0, 255])
        );
        assert!(parse_bytea("\\400").is_err());
        assert!(parse_bytea("\\1").is_err());
    }

    #[test]
    fn arrays() {
        let p = |s| parse_array(s);
        let s = |v: &str| Some(v.to_string());
        assert_eq!(p("{}"), Ok(Some(vec![])));
        assert_eq!(p("{1,2,NULL}"), Ok(Some(vec![s("1"), s("2"), None])));
        assert_eq!(
            p(r#"{"a b","c\"d","e\\f","NULL",null,""}"#),
            Ok(Some(vec![
                s("a b"),
                s("c\"d"),
                s("e\\f"),
                s("NULL"),
                None,
                s("")
            ]))
        );
        assert_eq!(p("{ 1 , 2 }"), Ok(Some(vec![s("1"), s("2")])));
        assert_eq!(p("{ñ,日本}"), Ok(Some(vec![s("ñ"), s("日本")])));
        assert_eq!(p("{{1,2},{3,4}}"), Ok(None));
        assert_eq!(p("[0:1]={1,2}"), Ok(None));
        for bad in [
            "", "{", "}", "1,2", "{1,,2}", "{\"a}", "{a\"b}", "{1,}", "{\\}",
        ] {
            assert!(p(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn decimals() {
        let d = |t: &str, p: u32, s: u32| {
            let mut o = Vec::new();
            let r = write_decimal(t, p, s, &mut o);
            (r, o)
        };
        let (r, o) = d("-12.34", 4, 2);
        assert_eq!(r, Ok(Written::Value));
        assert_eq!(o, [0x04, 0xfb, 0x2e]);
        assert_eq!(d("12.3", 5, 2).1, [0x04, 0x04, 0xce]); // 1230
        assert_eq!(d("12.300", 5, 2).0, Ok(Written::Value));
        assert_eq!(d("12.301", 5, 2).0, Ok(Written::Unrepresentable));
        assert_eq!(d("123456", 5, 0).0, Ok(Written::Unrepresentable));
        assert_eq!(d("NaN", 5, 0).0, Ok(Written::Unrepresentable));
        assert_eq!(d("-Infinity", 5, 0).0, Ok(Written::Unrepresentable));
        assert!(d("1e5", 5, 0).0.is_err());
        assert!(d("-", 5, 0).0.is_err());
        assert!(d(".", 5, 0).0.is_err());
        assert!(d("--1", 5, 0).0.is_err());
    }
}
