//! Time zones, wall-clock resolution and anchor dates. Every conversion here is checked:
//! the values come from manifests, and a date near the ends of chrono's range must give
//! an error or `None`, never a panic.

use std::str::FromStr;

use chrono::{DateTime, Datelike, FixedOffset, LocalResult, NaiveDateTime, TimeDelta, TimeZone};
use chrono_tz::Tz;

/// Years Python's `datetime` (and so Prefect) can hold.
pub const YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

pub fn timezone(tz: &str) -> Result<Tz, String> {
    Tz::from_str(tz).map_err(|_| format!("{tz:?} is not an IANA time zone name"))
}

/// Wall-clock time to instant as cron (and Prefect's interval arithmetic) resolve it: in
/// a gap, with the offset from before it (so the run moves later by the gap); in an
/// overlap, the first occurrence. `None` only at the ends of chrono's range.
pub fn resolve_forward(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Tz>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => Some(t),
        LocalResult::Ambiguous(first, _) => Some(first),
        LocalResult::None => {
            let before = offset_near(tz, wall, -1)?;
            Some(tz.from_utc_datetime(&wall.checked_sub_signed(before)?))
        }
    }
}

/// Wall-clock time to instant as dateutil resolves it: in a gap, with the offset from
/// after it (the run moves earlier by the gap); in an overlap, the first occurrence.
pub fn resolve_backward(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Tz>> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => Some(t),
        LocalResult::Ambiguous(first, _) => Some(first),
        LocalResult::None => {
            let after = offset_near(tz, wall, 1)?;
            Some(tz.from_utc_datetime(&wall.checked_sub_signed(after)?))
        }
    }
}

/// The UTC offset in force on the `direction` side of a gap around `wall`.
fn offset_near(tz: Tz, wall: NaiveDateTime, direction: i64) -> Option<TimeDelta> {
    use chrono::Offset;
    for hours in 1..=48 {
        let probe = wall.checked_add_signed(TimeDelta::hours(direction * hours))?;
        if let Some(t) = tz.from_local_datetime(&probe).earliest() {
            return Some(TimeDelta::seconds(t.offset().fix().local_minus_utc() as i64));
        }
    }
    None
}

/// RFC 3339, or a date-time without offset, which is read in the schedule's zone `tz`
/// (Prefect itself would read it as UTC; the operator sends it with an explicit offset).
/// Years outside 1-9999 (in the given offset or in UTC) and leap seconds are refused:
/// Python's datetime cannot hold them.
pub fn parse_anchor_date(s: &str, tz: Tz) -> Result<DateTime<FixedOffset>, String> {
    let t = parse_date_time(s, tz)?;
    let utc = t.naive_utc();
    if !YEARS.contains(&t.year()) || !YEARS.contains(&utc.year()) {
        return Err(format!(
            "{s:?} is outside the years 1-9999 that Prefect can store"
        ));
    }
    if t.timestamp_subsec_nanos() >= 1_000_000_000 {
        return Err(format!(
            "{s:?} is a leap second, which Prefect cannot store"
        ));
    }
    Ok(t)
}

fn parse_date_time(s: &str, tz: Tz) -> Result<DateTime<FixedOffset>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|fmt| NaiveDateTime::parse_from_str(s, fmt).ok())
    .or_else(|| {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    });
    let Some(naive) = naive else {
        return Err(format!(
            "{s:?} is not a date-time; use RFC 3339, e.g. 2024-01-01T00:00:00Z"
        ));
    };
    resolve_forward(tz, naive)
        .map(|t| t.fixed_offset())
        .ok_or_else(|| format!("{s:?} is outside the years 1-9999 that Prefect can store"))
}

/// RFC 3339 with the zone's offset: what status shows. Fractions of a second appear
/// only when the time has them.
pub fn format(t: &DateTime<Tz>) -> String {
    t.fixed_offset()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// An anchor date as Prefect is sent it: with its own offset, or in UTC when that offset
/// has seconds (local mean time, before a zone adopted standard time), which RFC 3339
/// cannot write without moving the instant.
pub fn format_anchor(t: &DateTime<FixedOffset>) -> String {
    if t.offset().local_minus_utc() % 60 == 0 {
        t.to_rfc3339()
    } else {
        t.with_timezone(&chrono::Utc).to_rfc3339()
    }
}
