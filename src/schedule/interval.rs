//! Interval schedules: the interval as Prefect takes it (seconds, ISO 8601 or
//! `[D day[s], ]HH:MM:SS`), held in microseconds as Python's `timedelta` holds it, and the
//! runs it makes from its anchor.
//!
//! Under a day (or any interval in UTC) the series is exact elapsed time; whole days in
//! another zone keep the wall-clock time, and a spring-forward gap moves the series for
//! good (Prefect's `whenever` arithmetic).

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use super::zone::resolve_forward;
use super::{Budget, Exhausted, MAX_CANDIDATES};

const MICROS_PER_DAY: i128 = 86_400_000_000;
/// Python's `timedelta.max`: 999999999 days, 23:59:59.999999.
const MAX_MICROS: i128 = 999_999_999 * MICROS_PER_DAY + MICROS_PER_DAY - 1;

/// A validated interval: at least a microsecond, at most `timedelta.max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Every {
    /// What the manifest wrote, in seconds: sent to Prefect as written.
    pub seconds: f64,
    /// The same, rounded to microseconds as Prefect stores it: used for arithmetic.
    pub micros: i128,
}

impl Every {
    /// Whole seconds go out as integers, as the manifest most likely wrote them.
    pub fn to_json(self) -> Value {
        if self.seconds.fract() == 0.0 {
            Value::from(self.seconds as i64)
        } else {
            Value::from(self.seconds)
        }
    }
}

/// An interval as Prefect takes it: seconds (a positive number), or a duration string
/// in ISO 8601 (`PT1H30M`, `P1D`, `P2W`) or `[D day[s], ]HH:MM:SS` form. Years and
/// months are refused: Prefect would count them as 365 and 30 days, which is not what
/// "every month" means (use cron or rrule for calendar months).
pub fn parse(v: &Value) -> Result<Every, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(n) => n,
            Err(_) => duration_string(s.trim())?,
        },
        _ => return Err("must be a number of seconds or a duration such as PT1H".into()),
    };
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{v} must be a positive interval"));
    }
    // Compared as floats first: a cast of a huge value to an integer saturates.
    if !secs.is_finite() || secs * 1e6 > MAX_MICROS as f64 {
        return Err(format!(
            "{v} is longer than the longest interval Prefect can hold (999999999 days)"
        ));
    }
    let micros = (secs * 1e6).round() as i128;
    if micros < 1 {
        return Err(format!(
            "{v} is shorter than a microsecond, the smallest interval Prefect can hold"
        ));
    }
    Ok(Every {
        seconds: secs,
        micros,
    })
}

fn duration_string(s: &str) -> Result<f64, String> {
    let bad = || {
        format!(
            "{s:?} is not an interval; use seconds or an ISO 8601 duration such as PT1H30M or P1D"
        )
    };
    if let Some(rest) = s.strip_prefix(['P', 'p']) {
        let (date, time) = match rest.split_once(['T', 't']) {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        let mut total = 0.0;
        let mut any = false;
        for (part, units) in [(date, "YMWD"), (time.unwrap_or(""), "HMS")] {
            let mut num = String::new();
            for c in part.chars() {
                if c.is_ascii_digit() || c == '.' {
                    num.push(c);
                    continue;
                }
                let u = c.to_ascii_uppercase();
                if !units.contains(u) || num.is_empty() {
                    return Err(bad());
                }
                let n: f64 = num.parse().map_err(|_| bad())?;
                num.clear();
                any = true;
                total += n * match (units, u) {
                    ("YMWD", 'Y') | ("YMWD", 'M') => {
                        return Err(format!(
                            "{s:?}: years and months are not fixed lengths (Prefect would count 365 and 30 days); use a cron or rrule schedule for calendar months"
                        ))
                    }
                    ("YMWD", 'W') => 604_800.0,
                    ("YMWD", 'D') => 86_400.0,
                    ("HMS", 'H') => 3600.0,
                    ("HMS", 'M') => 60.0,
                    _ => 1.0,
                };
            }
            if !num.is_empty() {
                return Err(bad());
            }
        }
        if !any || time == Some("") {
            return Err(bad());
        }
        return Ok(total);
    }
    // `[D day[s], ]HH:MM:SS[.f]`
    let (days, clock) = match s.split_once(',') {
        Some((d, c)) => (d.trim(), c.trim()),
        None => ("", s),
    };
    let days: f64 = if days.is_empty() {
        0.0
    } else {
        days.trim_end_matches("days")
            .trim_end_matches("day")
            .trim_end_matches('d')
            .trim()
            .parse()
            .map_err(|_| bad())?
    };
    let parts: Vec<&str> = clock.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err(bad());
    }
    let mut total = 0.0;
    for p in &parts {
        total = total * 60.0 + p.parse::<f64>().map_err(|_| bad())?;
    }
    if parts.len() == 2 {
        total *= 60.0; // HH:MM
    }
    Ok(days * 86_400.0 + total)
}

/// `t` moved by `micros` microseconds of elapsed time; `None` past chrono's range.
fn plus_micros(t: DateTime<Tz>, micros: i128) -> Option<DateTime<Tz>> {
    let delta = TimeDelta::microseconds(i64::try_from(micros).ok()?);
    t.checked_add_signed(delta)
}

/// The interval split as Prefect's arithmetic splits it: whole days (wall-clock in the
/// schedule's zone) and the rest (elapsed time).
struct Steps {
    tz: Tz,
    total: i128,
    days: i128,
    rest: i128,
}

impl Steps {
    /// `k` steps from `t`; `None` when the result leaves the representable range.
    fn step(&self, t: DateTime<Tz>, k: i128) -> Option<DateTime<Tz>> {
        let moved = if self.days != 0 {
            let days = i64::try_from(self.days.checked_mul(k)?).ok()?;
            let wall = t
                .naive_local()
                .checked_add_signed(TimeDelta::try_days(days)?)?;
            resolve_forward(self.tz, wall)?
        } else {
            t
        };
        plus_micros(moved, self.rest.checked_mul(k)?)
    }

    /// `k` intervals from the anchor in one jump: exact for pure elapsed time and for
    /// whole days; for mixed intervals, elapsed time as Prefect estimates it.
    fn jump(&self, anchor: DateTime<Tz>, k: i128) -> Option<DateTime<Tz>> {
        if self.days == 0 || self.rest == 0 {
            self.step(anchor, k)
        } else {
            plus_micros(anchor, self.total.checked_mul(k)?)
        }
    }
}

/// Before this, every zone keeps one offset (checked for every zone by a test).
pub fn fixed_era_end() -> chrono::NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(1800, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .unwrap_or_default()
}

/// The last occurrence of a whole-day series before 1800, reached in one jump: with no
/// transitions, the wall-clock time never moves.
fn skip_fixed_era(s: &Steps, anchor: DateTime<Tz>) -> Option<DateTime<Tz>> {
    let wall = anchor.naive_local();
    let span = (fixed_era_end() - wall).num_days();
    let k = i128::from(span.checked_sub(1)?) / s.days;
    if k <= 0 {
        return None;
    }
    let days = i64::try_from(k * s.days).ok()?;
    resolve_forward(s.tz, wall.checked_add_signed(TimeDelta::try_days(days)?)?)
}

/// The next `n` runs at or after `after` of the series through `anchor`. Runs beyond
/// the representable range end the series early.
pub fn runs(
    every: Every,
    anchor: DateTime<Utc>,
    tz: Tz,
    after: DateTime<Utc>,
    n: usize,
    budget: &mut Budget,
) -> Result<Vec<DateTime<Tz>>, Exhausted> {
    let total = every.micros;
    let days = total.div_euclid(MICROS_PER_DAY);
    let s = Steps {
        tz,
        total,
        days,
        rest: total - days * MICROS_PER_DAY,
    };
    let anchor = anchor.with_timezone(&tz);
    let calendar_days = s.days != 0 && s.rest == 0 && tz != Tz::UTC;
    let mut out = Vec::new();
    let mut next;
    if after >= anchor && calendar_days {
        // Walk from the anchor: a gap on the way moves every later occurrence. No zone
        // has a transition before 1800 (a test checks every zone), so the walk may
        // start at the last step before then, at the anchor's own wall-clock time.
        next = skip_fixed_era(&s, anchor).unwrap_or(anchor);
        while next < after {
            budget.spend(1)?;
            match s.step(next, 1) {
                Some(t) => next = t,
                None => return Ok(out),
            }
        }
    } else {
        let elapsed = after.signed_duration_since(anchor);
        let elapsed = elapsed
            .num_microseconds()
            .map(i128::from)
            .unwrap_or_else(|| {
                // Beyond i64 microseconds (about 292,000 years): milliseconds are plenty.
                i128::from(elapsed.num_milliseconds()) * 1000
            });
        let mut k = elapsed / total; // truncates toward zero, as Python's int()
        let Some(mut at) = s.jump(anchor, k) else {
            return Ok(out);
        };
        while at > after {
            budget.spend(1)?;
            k -= 1;
            match s.jump(anchor, k) {
                Some(t) => at = t,
                None => return Ok(out),
            }
        }
        let before_anchor = after < anchor && s.days != 0 && s.rest == 0;
        while at < after {
            budget.spend(1)?;
            let moved = if before_anchor && k < 0 {
                k += 1;
                s.jump(anchor, k)
            } else {
                s.step(at, 1)
            };
            match moved {
                Some(t) => at = t,
                None => return Ok(out),
            }
        }
        if before_anchor && k < 0 {
            // Prefect keeps counting from the anchor while before it.
            while out.len() < n {
                budget.spend(1)?;
                let Some(t) = s.jump(anchor, k) else { break };
                if !out.contains(&t) {
                    out.push(t);
                }
                k += 1;
            }
            return Ok(out);
        }
        next = at;
    }
    for _ in 0..MAX_CANDIDATES {
        if out.len() >= n {
            break;
        }
        if !out.contains(&next) {
            out.push(next);
        }
        match s.step(next, 1) {
            Some(t) => next = t,
            None => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, Offset, TimeZone};

    /// `skip_fixed_era` relies on this: no zone changes its offset before 1800.
    #[test]
    fn no_zone_has_a_transition_before_1800() {
        let end = fixed_era_end().and_utc();
        for tz in chrono_tz::TZ_VARIANTS {
            let first = tz
                .offset_from_utc_datetime(&NaiveDate::from_ymd_opt(1, 1, 1).unwrap().into())
                .fix();
            let mut t = NaiveDate::from_ymd_opt(1, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap();
            while t < end.naive_utc() {
                assert_eq!(tz.offset_from_utc_datetime(&t).fix(), first, "{tz} at {t}");
                t += TimeDelta::days(30);
            }
        }
    }

    #[test]
    fn a_year_one_anchor_keeps_its_wall_clock_time() {
        let tz = Tz::America__New_York;
        let anchor = crate::schedule::zone::parse_anchor_date("0001-01-01T00:00:00", tz).unwrap();
        let every = parse(&Value::from(86400)).unwrap();
        let after = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
        let mut budget = Budget::new(u64::MAX, std::time::Duration::from_secs(60));
        let runs = runs(every, anchor.with_timezone(&Utc), tz, after, 3, &mut budget).unwrap();
        let shown: Vec<String> = runs.iter().map(crate::schedule::zone::format).collect();
        assert_eq!(
            shown,
            [
                "2026-11-27T00:00:00-05:00",
                "2026-11-28T00:00:00-05:00",
                "2026-11-29T00:00:00-05:00"
            ]
        );
        assert!(budget.spent() < 100_000, "{} steps", budget.spent());
    }
}
