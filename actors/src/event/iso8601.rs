//! ISO 8601 date-times as PostHog's luxon reads them, for the envelope's `now` and `sent_at` and
//! the event's own `timestamp`.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, Utc};

/// Parses an ISO 8601 date or date-time as leniently as luxon's `DateTime.fromISO`.
///
/// Accepted: `YYYY`, `YYYY-MM`, `YYYY-MM-DD` or `YYYYMMDD`, optionally followed by `T`, `t`
/// or a space and a time `HH[:MM[:SS[.fraction]]]` (or `HH[MM[SS[.fraction]]]`), the
/// fraction separated by `.` or `,`, then an optional zone `Z`, `±HH`, `±HHMM` or `±HH:MM`.
/// A time without a zone is UTC: luxon would use the process zone, which is UTC in PostHog's
/// deployments. Ordinal and week dates, six-digit years and `[Zone/Name]` suffixes are not
/// accepted; clients do not send them.
pub fn parse_iso8601(text: &str) -> Option<DateTime<Utc>> {
    let mut cursor = Cursor {
        bytes: text.as_bytes(),
        position: 0,
    };

    let year = cursor.digits(4)?;
    let (month, day) = if cursor.eat(b'-') {
        let month = cursor.digits(2)?;
        let day = if cursor.eat(b'-') {
            cursor.digits(2)?
        } else {
            1
        };
        (month, day)
    } else if cursor.peek_digit() {
        (cursor.digits(2)?, cursor.digits(2)?)
    } else {
        (1, 1)
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;

    if cursor.at_end() {
        return Some(date.and_time(NaiveTime::MIN).and_utc());
    }
    if !(cursor.eat(b'T') || cursor.eat(b't') || cursor.eat(b' ')) {
        return None;
    }

    let hour = cursor.digits(2)?;
    let mut minute = 0;
    let mut second = 0;
    let mut nanosecond = 0;
    let extended = cursor.peek() == Some(b':');
    if cursor.eat(b':') || (!extended && cursor.peek_digit()) {
        minute = cursor.digits(2)?;
        if (extended && cursor.eat(b':')) || (!extended && cursor.peek_digit()) {
            second = cursor.digits(2)?;
            if cursor.eat(b'.') || cursor.eat(b',') {
                nanosecond = cursor.fraction_as_nanoseconds()?;
            }
        }
    }
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanosecond)?;

    let offset_seconds = match cursor.next() {
        None => 0,
        Some(b'Z' | b'z') => 0,
        Some(sign @ (b'+' | b'-')) => {
            let hours = cursor.digits(2)?;
            let minutes = if cursor.at_end() {
                0
            } else {
                cursor.eat(b':');
                cursor.digits(2)?
            };
            if hours > 23 || minutes > 59 {
                return None;
            }
            let magnitude = i32::try_from(hours * 3600 + minutes * 60).ok()?;
            if sign == b'-' { -magnitude } else { magnitude }
        }
        Some(_) => return None,
    };
    if !cursor.at_end() {
        return None;
    }

    let offset = FixedOffset::east_opt(offset_seconds)?;
    let local = date.and_time(time);
    let utc = local.checked_sub_offset(offset)?;
    Some(utc.and_utc())
}

/// A byte position in ASCII date text; every method returns `None` rather than panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn peek_digit(&self) -> bool {
        self.peek().is_some_and(|byte| byte.is_ascii_digit())
    }

    fn at_end(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.position += 1;
        Some(byte)
    }

    fn eat(&mut self, expected: u8) -> bool {
        if self.peek() == Some(expected) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    /// Exactly `count` decimal digits as a number.
    fn digits(&mut self, count: usize) -> Option<u32> {
        let mut value = 0u32;
        for _ in 0..count {
            let byte = self.next()?;
            if !byte.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(byte - b'0');
        }
        Some(value)
    }

    /// One or more digits after the decimal separator; digits past nanoseconds are dropped.
    fn fraction_as_nanoseconds(&mut self) -> Option<u32> {
        let mut nanoseconds = 0u32;
        let mut scale = 100_000_000u32;
        let start = self.position;
        while let Some(byte) = self.peek().filter(u8::is_ascii_digit) {
            nanoseconds += u32::from(byte - b'0') * scale;
            scale /= 10;
            self.position += 1;
        }
        (self.position > start).then_some(nanoseconds)
    }
}
