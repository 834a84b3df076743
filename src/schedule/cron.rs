//! Cron as Prefect (croniter) reads it: five fields or a macro, wall-clock times, and a
//! time skipped by a spring-forward gap running after the gap.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;

use super::zone::resolve_forward;
use super::{Budget, Exhausted, MAX_CANDIDATES};

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

    /// Whether a day matching day-of-month or day-of-week is enough (else both).
    pub fn day_or(&self) -> bool {
        self.day_or
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

    /// The first matching wall-clock minute strictly after `t`, searching ~30 years;
    /// each day looked at is one step of `budget`.
    pub fn next_after(
        &self,
        t: NaiveDateTime,
        budget: &mut Budget,
    ) -> Result<Option<NaiveDateTime>, Exhausted> {
        let Some(start) = t.checked_add_signed(TimeDelta::minutes(1)) else {
            return Ok(None);
        };
        let mut date = start.date();
        for _ in 0..(366 * 30) {
            budget.spend(1)?;
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
                        return Ok(date.and_hms_opt(h, m, 0));
                    }
                }
            }
            let Some(next) = date.succ_opt() else {
                return Ok(None);
            };
            date = next;
        }
        Ok(None)
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

/// The next `n` runs at or after `after`.
pub fn runs(
    cron: &Cron,
    tz: Tz,
    after: DateTime<Utc>,
    n: usize,
    budget: &mut Budget,
) -> Result<Vec<DateTime<Tz>>, Exhausted> {
    // Start a few hours early in wall-clock terms: resolving a gap moves a time later, so
    // a wall time before `after` can still land at or after it.
    let local = after.with_timezone(&tz).naive_local();
    let Some(mut wall) = local.checked_sub_signed(TimeDelta::minutes(181)) else {
        return Ok(Vec::new());
    };
    let mut found: Vec<DateTime<Tz>> = Vec::new();
    for _ in 0..MAX_CANDIDATES {
        let Some(next) = cron.next_after(wall, budget)? else {
            break;
        };
        wall = next;
        let Some(t) = resolve_forward(tz, next) else {
            break;
        };
        if t >= after && !found.contains(&t) {
            found.push(t);
        }
        // Gaps make the mapping non-monotonic by at most a few hours; once we are well
        // past the n-th time, nothing earlier can appear.
        if found.len() >= n {
            found.sort();
            let nth = found[n - 1].naive_local();
            if nth
                .checked_add_signed(TimeDelta::hours(3))
                .is_none_or(|limit| next > limit)
            {
                break;
            }
        }
    }
    found.sort();
    found.truncate(n);
    Ok(found)
}
