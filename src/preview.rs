//! Pure: the next fire times of a Prefect schedule, computed the way Prefect's scheduler
//! computes them, so `kubectl get` can show when a deployment will run next.
//!
//! Each kind has its own daylight-saving rules in Prefect, and they differ:
//! - cron: wall-clock times; a time skipped by a spring-forward gap runs after the gap
//!   (02:30 -> 03:30), a repeated time runs once, at its first occurrence;
//! - rrule (dateutil): wall-clock times; a skipped time is read with the offset in force
//!   after the gap, which lands before it (02:30 -> 01:30), a repeated time runs once;
//! - interval: under a day (or any interval in UTC) is exact elapsed time; whole days in
//!   another zone keep the wall-clock time, and a gap moves the series for good.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;
use serde_json::Value;

use crate::api::ScheduleStatus;
use crate::validate::{parse_anchor_date, timezone};

/// Checks at most this many candidate times per schedule (Prefect checks 1000).
const MAX_CANDIDATES: usize = 1000;
/// How many upcoming runs status shows per schedule.
pub const RUNS_SHOWN: usize = 3;

/// The next `n` fire times at or after `after` of a Prefect schedule body (the inner
/// `{"cron"|"interval"|"rrule", "timezone", ...}` object), in the schedule's zone.
pub fn next_runs(
    schedule: &Value,
    after: DateTime<Utc>,
    n: usize,
) -> Result<Vec<DateTime<Tz>>, String> {
    let tz = match schedule.get("timezone").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => timezone(name)?,
        _ => Tz::UTC,
    };
    if let Some(cron) = schedule.get("cron").and_then(Value::as_str) {
        let day_or = schedule
            .get("day_or")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        return cron_runs(&Cron::parse(cron, day_or)?, tz, after, n);
    }
    if let Some(rule) = schedule.get("rrule").and_then(Value::as_str) {
        return rrule_runs(rule, tz, after, n);
    }
    let seconds = schedule
        .get("interval")
        .and_then(Value::as_f64)
        .ok_or("schedule has no cron, rrule or interval")?;
    let anchor = schedule
        .get("anchor_date")
        .and_then(Value::as_str)
        .ok_or("interval schedule has no anchor_date")?;
    let anchor = parse_anchor_date(anchor, tz)?.with_timezone(&Utc);
    interval_runs(seconds, anchor, tz, after, n)
}

/// The status preview of a deployment's schedules: for each `(slug, schedule entry)` of
/// the desired `DeploymentScheduleCreate` bodies, its next `RUNS_SHOWN` runs after `now`,
/// and the earliest of all. An interval schedule without anchor_date is anchored where
/// Prefect anchored it (`seen`: the schedules Prefect reported), else on the first run
/// shown before (`previous`), which is a point of the same series.
pub fn schedules_preview(
    desired: &[(String, Value)],
    paused: bool,
    seen: &[Value],
    previous: &[ScheduleStatus],
    now: DateTime<Utc>,
) -> (Vec<ScheduleStatus>, Option<String>) {
    let mut out = Vec::new();
    let mut earliest: Option<DateTime<Tz>> = None;
    for (slug, entry) in desired {
        let active = entry.get("active").and_then(Value::as_bool).unwrap_or(true);
        let mut schedule = entry.get("schedule").cloned().unwrap_or(Value::Null);
        if schedule.get("interval").is_some() && schedule.get("anchor_date").is_none() {
            let from_prefect = seen
                .iter()
                .find(|s| s.get("slug").and_then(Value::as_str) == Some(slug.as_str()))
                .and_then(|s| s.pointer("/schedule/anchor_date"))
                .cloned();
            let from_status = previous
                .iter()
                .find(|p| &p.slug == slug)
                .and_then(|p| p.next_runs.first())
                .map(|t| Value::String(t.clone()));
            if let Some(anchor) = from_prefect.or(from_status) {
                schedule["anchor_date"] = anchor;
            }
        }
        let runs = if paused || !active {
            Vec::new()
        } else {
            next_runs(&schedule, now, RUNS_SHOWN).unwrap_or_default()
        };
        if let Some(first) = runs.first() {
            if earliest.is_none_or(|e| first < &e) {
                earliest = Some(*first);
            }
        }
        out.push(ScheduleStatus {
            slug: slug.clone(),
            next_runs: runs.iter().map(format).collect(),
        });
    }
    (out, earliest.as_ref().map(format))
}

/// Wall-clock time to instant as cron (and Prefect's interval arithmetic) resolve it: in
/// a gap, with the offset from before it (so the run moves later by the gap); in an
/// overlap, the first occurrence.
pub fn resolve_forward(tz: Tz, wall: NaiveDateTime) -> DateTime<Tz> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(first, _) => first,
        LocalResult::None => {
            let before = offset_near(tz, wall, -1);
            tz.from_utc_datetime(&(wall - before))
        }
    }
}

/// Wall-clock time to instant as dateutil resolves it: in a gap, with the offset from
/// after it (the run moves earlier by the gap); in an overlap, the first occurrence.
fn resolve_backward(tz: Tz, wall: NaiveDateTime) -> DateTime<Tz> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(first, _) => first,
        LocalResult::None => {
            let after = offset_near(tz, wall, 1);
            tz.from_utc_datetime(&(wall - after))
        }
    }
}

/// The UTC offset in force on the `direction` side of a gap around `wall`.
fn offset_near(tz: Tz, wall: NaiveDateTime, direction: i64) -> Duration {
    use chrono::Offset;
    for hours in 1..=48 {
        if let Some(t) = tz
            .from_local_datetime(&(wall + Duration::hours(direction * hours)))
            .earliest()
        {
            return Duration::seconds(t.offset().fix().local_minus_utc() as i64);
        }
    }
    Duration::zero()
}

// ---------------------------------------------------------------------------------
// cron

/// A parsed five-field cron expression in croniter's dialect.
#[derive(Debug, Clone)]
pub struct Cron {
    minutes: [bool; 60],
    hours: [bool; 24],
    days: [bool; 32],
    last_day: bool,
    months: [bool; 13],
    weekdays: [bool; 7],
    /// `(weekday, n)`: the n-th such weekday of the month (`1#2`).
    nth_weekdays: Vec<(u32, u32)>,
    /// Weekdays given as "the last one of the month" (`L5`).
    last_weekdays: Vec<u32>,
    day_or: bool,
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    /// Parses an expression (five fields or a macro); errors name the field at fault.
    pub fn parse(expr: &str, day_or: bool) -> Result<Cron, String> {
        let trimmed = expr.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            m if m.starts_with('@') => {
                return Err(format!("{trimmed:?} is not a known cron macro"))
            }
            _ => trimmed.to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        match fields.len() {
            5 => {}
            6 => {
                return Err(format!(
                    "{trimmed:?} has 6 fields; Prefect would read the last one as seconds. Use 5 fields: minute hour day-of-month month day-of-week"
                ))
            }
            n => {
                return Err(format!(
                    "{trimmed:?} has {n} fields; expected 5: minute hour day-of-month month day-of-week"
                ))
            }
        }
        let mut c = Cron {
            minutes: [false; 60],
            hours: [false; 24],
            days: [false; 32],
            last_day: false,
            months: [false; 13],
            weekdays: [false; 7],
            nth_weekdays: Vec::new(),
            last_weekdays: Vec::new(),
            day_or,
            days_restricted: fields[2] != "*" && fields[2] != "?",
            weekdays_restricted: fields[4] != "*" && fields[4] != "?",
        };
        let names = ["minute", "hour", "day-of-month", "month", "day-of-week"];
        for (pos, field) in fields.iter().enumerate() {
            for item in field.split(',') {
                c.item(pos, item)
                    .map_err(|m| format!("{} field {field:?}: {m}", names[pos]))?;
            }
        }
        // croniter treats a field that lists every value like `*`.
        if c.days_restricted && c.days[1..].iter().all(|d| *d) {
            c.days_restricted = false;
        }
        if c.weekdays_restricted
            && c.weekdays.iter().all(|d| *d)
            && c.nth_weekdays.is_empty()
            && c.last_weekdays.is_empty()
        {
            c.weekdays_restricted = false;
        }
        Ok(c)
    }

    fn item(&mut self, pos: usize, item: &str) -> Result<(), String> {
        let (lo, hi, names, base): (u32, u32, &[&str], u32) = match pos {
            0 => (0, 59, &[], 0),
            1 => (0, 23, &[], 0),
            2 => (1, 31, &[], 0),
            3 => (1, 12, &MONTHS, 1),
            _ => (0, 7, &DAYS, 0),
        };
        let value = |s: &str| -> Result<u32, String> {
            if let Ok(n) = s.parse::<u32>() {
                return if (lo..=hi).contains(&n) {
                    Ok(n)
                } else {
                    Err(format!("{n} is outside {lo}-{hi}"))
                };
            }
            names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(s))
                .map(|p| p as u32 + base)
                .ok_or_else(|| format!("{s:?} is not a number in {lo}-{hi}"))
        };
        if item.is_empty() {
            return Err("empty list item".into());
        }
        if pos == 2 && item.eq_ignore_ascii_case("l") {
            self.last_day = true;
            return Ok(());
        }
        if pos == 4 {
            if let Some((d, n)) = item.split_once('#') {
                let d = value(d)? % 7;
                return match n.parse::<u32>() {
                    Ok(k @ 1..=5) => {
                        self.nth_weekdays.push((d, k));
                        Ok(())
                    }
                    _ => Err(format!("{item:?}: the number after # must be 1-5")),
                };
            }
            // croniter writes "last Friday of the month" as `L5` (not `5L`).
            if let Some(d) = item.strip_prefix(['L', 'l']) {
                if !d.is_empty() {
                    let d = value(d)? % 7;
                    self.last_weekdays.push(d);
                    return Ok(());
                }
            }
        }
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => match s.parse::<u32>() {
                Ok(n) if n > 0 => (r, n),
                _ => return Err(format!("{item:?}: step must be a positive number")),
            },
            None => (item, 1),
        };
        let (a, b) = if range == "*" || range == "?" {
            (lo, hi)
        } else {
            match range.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None => {
                    let a = value(range)?;
                    // `a/step` means from a to the end of the range, as in croniter.
                    (a, if step > 1 { hi } else { a })
                }
            }
        };
        let span: Vec<u32> = if a <= b {
            (a..=b).collect()
        } else if pos == 4 {
            // croniter accepts wrap-around ranges for day-of-week (`5-1`: Fri..Mon).
            (a..=hi).chain(lo..=b).collect()
        } else {
            return Err(format!("range {range:?} runs backwards"));
        };
        for v in span.into_iter().step_by(step as usize) {
            match pos {
                0 => self.minutes[v as usize] = true,
                1 => self.hours[v as usize] = true,
                2 => self.days[v as usize] = true,
                3 => self.months[v as usize] = true,
                _ => self.weekdays[(v % 7) as usize] = true,
            }
        }
        Ok(())
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        if !self.months[date.month() as usize] {
            return false;
        }
        let last = last_day_of_month(date);
        let dom = self.days[date.day() as usize] || (self.last_day && date.day() == last);
        let wd = date.weekday().num_days_from_sunday();
        let dow = self.weekdays[wd as usize]
            || self
                .nth_weekdays
                .iter()
                .any(|(d, n)| *d == wd && (date.day() - 1) / 7 + 1 == *n)
            || self
                .last_weekdays
                .iter()
                .any(|d| *d == wd && date.day() + 7 > last);
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) if self.day_or => dom || dow,
            (true, true) => dom && dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first matching wall-clock minute strictly after `t`, searching ~30 years.
    pub fn next_after(&self, t: NaiveDateTime) -> Option<NaiveDateTime> {
        let start = t + Duration::minutes(1);
        let mut date = start.date();
        for _ in 0..(366 * 30) {
            if self.day_matches(date) {
                let first_day = date == start.date();
                for h in 0..24u32 {
                    if !self.hours[h as usize] || (first_day && h < start.hour()) {
                        continue;
                    }
                    for m in 0..60u32 {
                        if !self.minutes[m as usize]
                            || (first_day && h == start.hour() && m < start.minute())
                        {
                            continue;
                        }
                        return date.and_hms_opt(h, m, 0);
                    }
                }
            }
            date = date.succ_opt()?;
        }
        None
    }

    /// Whether any day in a full 400-year Gregorian cycle matches (`0 0 31 2 *` never
    /// does; `0 0 29 2 1` with day_or false does, rarely).
    pub fn ever_fires(&self) -> bool {
        let mut date = NaiveDate::from_ymd_opt(2000, 1, 1).expect("valid date");
        let end = NaiveDate::from_ymd_opt(2400, 1, 1).expect("valid date");
        while date < end {
            if self.day_matches(date) {
                return true;
            }
            date = date.succ_opt().expect("in range");
        }
        false
    }
}

fn last_day_of_month(d: NaiveDate) -> u32 {
    let (y, m) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|f| f.pred_opt())
        .map(|l| l.day())
        .unwrap_or(28)
}

fn cron_runs(
    cron: &Cron,
    tz: Tz,
    after: DateTime<Utc>,
    n: usize,
) -> Result<Vec<DateTime<Tz>>, String> {
    // Start a few hours early in wall-clock terms: resolving a gap moves a time later, so
    // a wall time before `after` can still land at or after it.
    let local = after.with_timezone(&tz).naive_local();
    let mut wall = local - Duration::hours(3) - Duration::minutes(1);
    let mut found: Vec<DateTime<Tz>> = Vec::new();
    for _ in 0..MAX_CANDIDATES {
        let Some(next) = cron.next_after(wall) else {
            break;
        };
        wall = next;
        let t = resolve_forward(tz, next);
        if t >= after && !found.contains(&t) {
            found.push(t);
        }
        // Gaps make the mapping non-monotonic by at most a few hours; once we are well
        // past the n-th time, nothing earlier can appear.
        if found.len() >= n {
            found.sort();
            let nth = found[n - 1].naive_local();
            if next > nth + Duration::hours(3) {
                break;
            }
        }
    }
    found.sort();
    found.truncate(n);
    Ok(found)
}

// ---------------------------------------------------------------------------------
// interval

fn interval_runs(
    seconds: f64,
    anchor: DateTime<Utc>,
    tz: Tz,
    after: DateTime<Utc>,
    n: usize,
) -> Result<Vec<DateTime<Tz>>, String> {
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("interval must be positive".into());
    }
    let total_ms = (seconds * 1000.0).round() as i64;
    let days = total_ms.div_euclid(86_400_000);
    let rest_ms = total_ms - days * 86_400_000;
    let anchor = anchor.with_timezone(&tz);
    let calendar_days = days != 0 && rest_ms == 0 && tz != Tz::UTC;
    // One step: whole days in local wall-clock time, the rest as elapsed time.
    let step = |t: DateTime<Tz>, k: i64| -> DateTime<Tz> {
        let moved = if days != 0 {
            resolve_forward(tz, t.naive_local() + Duration::days(days * k))
        } else {
            t
        };
        moved + Duration::milliseconds(rest_ms * k)
    };
    let mut next;
    if after >= anchor && calendar_days {
        // Walk from the anchor: a gap on the way moves every later occurrence.
        next = anchor;
        let mut guard = 0u32;
        while next < after {
            next = step(next, 1);
            guard += 1;
            if guard > 2_000_000 {
                return Err("anchor_date is too far in the past to compute".into());
            }
        }
    } else {
        let jump = |k: i64| -> DateTime<Tz> {
            if days == 0 || rest_ms == 0 {
                step(anchor, k)
            } else {
                anchor + Duration::milliseconds(total_ms * k)
            }
        };
        let elapsed = after.signed_duration_since(anchor).num_milliseconds();
        let mut k = elapsed / total_ms; // truncates toward zero, as Python's int()
        next = jump(k);
        while next > after {
            k -= 1;
            next = jump(k);
        }
        let before_anchor = after < anchor && days != 0 && rest_ms == 0;
        while next < after {
            if before_anchor && k < 0 {
                k += 1;
                next = jump(k);
            } else {
                next = step(next, 1);
            }
        }
        if before_anchor && k < 0 {
            // Prefect keeps counting from the anchor while before it.
            let mut out = Vec::new();
            while out.len() < n {
                let t = jump(k);
                if !out.contains(&t) {
                    out.push(t);
                }
                k += 1;
            }
            return Ok(out);
        }
    }
    let mut out = Vec::new();
    for _ in 0..MAX_CANDIDATES {
        if out.len() >= n {
            break;
        }
        if !out.contains(&next) {
            out.push(next);
        }
        next = step(next, 1);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// rrule

fn rrule_runs(
    rule: &str,
    tz: Tz,
    after: DateTime<Utc>,
    n: usize,
) -> Result<Vec<DateTime<Tz>>, String> {
    let after_local = after.with_timezone(&tz).naive_local();
    let text = wall_clock_rrule(rule, after_local);
    let set: rrule::RRuleSet = text.parse().map_err(|e: rrule::RRuleError| e.to_string())?;
    let mut out: Vec<DateTime<Tz>> = Vec::new();
    let mut iterations = 0usize;
    for t in &set {
        iterations += 1;
        if iterations > 3_000_000 {
            break;
        }
        let wall = t.naive_utc();
        // Resolving moves a time by at most the size of a gap; skip the far past fast.
        if wall < after_local - Duration::hours(3) {
            continue;
        }
        let t = resolve_backward(tz, wall);
        if t >= after && !out.contains(&t) {
            out.push(t);
            if out.len() >= n {
                break;
            }
        }
        if wall > after_local + Duration::days(366 * 200) {
            break;
        }
    }
    out.sort();
    Ok(out)
}

/// Rewrites a Prefect rrule so the `rrule` crate generates wall-clock times: every date
/// is written as UTC, since Prefect relabels DTSTART, UNTIL, RDATE and EXDATE with the
/// schedule's zone without converting them. Without a DTSTART, Prefect's default
/// (2020-01-01 00:00) is used; for minutely and secondly rules without COUNT it is moved
/// forward by whole periods, as Prefect does, so the walk does not start in 2020.
pub(crate) fn wall_clock_rrule(rule: &str, now_wall: NaiveDateTime) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut has_start = false;
    for line in rule.trim().lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name_params, value) = match line.split_once(':') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => ("RRULE".to_string(), line.to_string()),
        };
        let name = name_params
            .split(';')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        match name.as_str() {
            "DTSTART" | "RDATE" | "EXDATE" => {
                has_start |= name == "DTSTART";
                let values: Vec<String> = value.split(',').map(as_utc_value).collect();
                lines.push(format!("{name}:{}", values.join(",")));
            }
            "RRULE" | "EXRULE" => {
                let parts: Vec<String> = value
                    .split(';')
                    .map(|p| match p.split_once('=') {
                        Some((k, v)) if k.eq_ignore_ascii_case("UNTIL") => {
                            format!("UNTIL={}", as_utc_value(v))
                        }
                        _ => p.to_string(),
                    })
                    .collect();
                lines.push(format!("{name}:{}", parts.join(";")));
            }
            _ => lines.push(line.to_string()),
        }
    }
    if !has_start {
        let default = NaiveDate::from_ymd_opt(2020, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("valid date");
        let start = advanced_start(&lines, default, now_wall).unwrap_or(default);
        lines.insert(0, format!("DTSTART:{}Z", start.format("%Y%m%dT%H%M%S")));
    }
    lines.join("\n")
}

fn as_utc_value(v: &str) -> String {
    let v = v.trim().trim_end_matches(['Z', 'z']);
    if v.len() == 8 {
        format!("{v}T000000Z")
    } else {
        format!("{v}Z")
    }
}

/// For a single MINUTELY/SECONDLY rule without COUNT: the latest whole-period step from
/// the default start that is a day before `now`, which yields the same future times.
fn advanced_start(
    lines: &[String],
    default: NaiveDateTime,
    now: NaiveDateTime,
) -> Option<NaiveDateTime> {
    let rules: Vec<&String> = lines.iter().filter(|l| l.starts_with("RRULE:")).collect();
    if rules.len() != 1 || lines.len() != 1 {
        return None;
    }
    let mut unit = 0i64;
    let mut interval = 1i64;
    for part in rules[0].trim_start_matches("RRULE:").split(';') {
        let (k, v) = part.split_once('=')?;
        match k.to_ascii_uppercase().as_str() {
            "FREQ" if v.eq_ignore_ascii_case("MINUTELY") => unit = 60,
            "FREQ" if v.eq_ignore_ascii_case("SECONDLY") => unit = 1,
            "INTERVAL" => interval = v.parse().ok()?,
            "COUNT" => return None,
            _ => {}
        }
    }
    let period = unit * interval;
    if period <= 0 {
        return None;
    }
    let target = now.checked_sub_signed(Duration::days(1))?;
    let elapsed = (target - default).num_seconds();
    if elapsed <= 0 {
        return None;
    }
    Some(default + Duration::seconds(elapsed / period * period))
}

/// RFC 3339 with the zone's offset: what status shows. Fractions of a second appear
/// only when the schedule has them (an anchor Prefect took from its clock).
pub fn format(t: &DateTime<Tz>) -> String {
    t.fixed_offset()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn runs(schedule: Value, after: &str) -> Vec<String> {
        next_runs(&schedule, at(after), 3)
            .unwrap()
            .iter()
            .map(format)
            .collect()
    }

    // Expected values below were produced by Prefect 3.9.1's own schedule classes.
    #[test]
    fn cron_dst_gap_runs_after_the_gap_and_overlap_once() {
        let s = json!({"cron": "30 2 * * *", "timezone": "America/New_York"});
        assert_eq!(
            runs(s, "2027-03-13T00:00:00Z"),
            [
                "2027-03-13T02:30:00-05:00",
                "2027-03-14T03:30:00-04:00",
                "2027-03-15T02:30:00-04:00"
            ]
        );
        let s = json!({"cron": "30 1 * * *", "timezone": "America/New_York"});
        assert_eq!(
            runs(s, "2027-11-06T00:00:00Z"),
            [
                "2027-11-06T01:30:00-04:00",
                "2027-11-07T01:30:00-04:00",
                "2027-11-08T01:30:00-05:00"
            ]
        );
    }

    #[test]
    fn rrule_dst_gap_runs_before_the_gap() {
        let s = json!({"rrule": "FREQ=DAILY;BYHOUR=2;BYMINUTE=30", "timezone": "America/New_York"});
        assert_eq!(
            runs(s, "2027-03-13T00:00:00Z"),
            [
                "2027-03-13T02:30:00-05:00",
                "2027-03-14T01:30:00-05:00",
                "2027-03-15T02:30:00-04:00"
            ]
        );
        let s = json!({"rrule": "FREQ=DAILY;BYHOUR=1;BYMINUTE=30", "timezone": "America/New_York"});
        assert_eq!(
            runs(s, "2027-11-06T00:00:00Z"),
            [
                "2027-11-06T01:30:00-04:00",
                "2027-11-07T01:30:00-04:00",
                "2027-11-08T01:30:00-05:00"
            ]
        );
    }

    #[test]
    fn interval_days_keep_wall_clock_hours_follow_utc() {
        let s = json!({"interval": 86400, "anchor_date": "2027-03-01T02:30:00+00:00", "timezone": "America/New_York"});
        assert_eq!(
            runs(s, "2027-03-13T00:00:00Z"),
            [
                "2027-03-12T21:30:00-05:00",
                "2027-03-13T21:30:00-05:00",
                "2027-03-14T21:30:00-04:00"
            ]
        );
        let s = json!({"interval": 3600, "anchor_date": "2027-03-01T02:30:00+00:00", "timezone": "America/New_York"});
        assert_eq!(
            runs(s, "2027-03-14T05:00:00Z"),
            [
                "2027-03-14T00:30:00-05:00",
                "2027-03-14T01:30:00-05:00",
                "2027-03-14T03:30:00-04:00"
            ]
        );
    }

    #[test]
    fn cron_fields() {
        let c = Cron::parse("0 0 31 2 *", true).unwrap();
        assert!(!c.ever_fires());
        let c = Cron::parse("0 0 29 2 1", false).unwrap();
        assert!(c.ever_fires());
        let s = json!({"cron": "0 9 * * 1#2", "timezone": "UTC"});
        assert_eq!(
            runs(s, "2026-11-24T00:00:00Z"),
            [
                "2026-12-14T09:00:00Z",
                "2027-01-11T09:00:00Z",
                "2027-02-08T09:00:00Z"
            ]
        );
        let s = json!({"cron": "0 0 L * *", "timezone": "UTC"});
        assert_eq!(
            runs(s, "2027-01-31T00:00:00Z"),
            [
                "2027-01-31T00:00:00Z",
                "2027-02-28T00:00:00Z",
                "2027-03-31T00:00:00Z"
            ]
        );
    }
}
