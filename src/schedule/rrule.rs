//! RFC 5545 recurrence rules as Prefect (dateutil) reads them: with or without an
//! `RRULE:` prefix and a DTSTART line, wall-clock times, and a time skipped by a
//! spring-forward gap read with the offset in force after it (so it runs before the gap).

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use rrule::{Frequency, RRule, RRuleSet};

use super::zone::resolve_backward;
use super::{Budget, NoRuns};

/// The longest rrule Prefect stores.
pub const MAX_LEN: usize = 6500;

/// A parsed rule. Dates are held as wall-clock times labelled UTC, since Prefect
/// relabels DTSTART, UNTIL, RDATE and EXDATE with the schedule's zone without
/// converting them.
#[derive(Debug, Clone)]
pub struct Rule {
    set: RRuleSet,
}

/// Parses a rule as Prefect stores it; the error says what is wrong in the crate's words.
pub fn parse(rule: &str) -> Result<Rule, String> {
    if rule.len() > MAX_LEN {
        return Err(format!(
            "is {} characters; Prefect allows at most {MAX_LEN}",
            rule.len()
        ));
    }
    let text = wall_clock(rule);
    let set: RRuleSet = text.parse().map_err(|e: rrule::RRuleError| {
        let e = e.to_string();
        let e = e
            .strip_prefix("RRule parsing error: ")
            .unwrap_or(&e)
            .to_string();
        format!("{rule:?} is not a valid RFC 5545 rule: {e}")
    })?;
    // A set is a union: a rule given twice adds nothing but work.
    let mut rrules: Vec<RRule> = Vec::new();
    for r in set.get_rrule() {
        if !rrules.contains(r) {
            rrules.push(r.clone());
        }
    }
    let set = set.set_rrules(rrules);
    Ok(Rule { set })
}

/// The time zones the rule's date lines name (`DTSTART;TZID=Europe/Paris:...`), each
/// once, in order. Prefect ignores them: it reads every date in the schedule's zone.
pub fn zones_named(rule: &str) -> Vec<String> {
    let mut zones: Vec<String> = Vec::new();
    for line in content_lines(rule) {
        if !matches!(line.name.as_str(), "DTSTART" | "RDATE" | "EXDATE") {
            continue;
        }
        for p in line.params.split(';') {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("TZID") && !zones.iter().any(|z| z == v.trim()) {
                    zones.push(v.trim().to_string());
                }
            }
        }
    }
    zones
}

/// One content line of a rule.
struct ContentLine<'a> {
    /// Upper-cased.
    name: String,
    /// What follows the name up to the colon, without the leading `;`.
    params: &'a str,
    value: &'a str,
    text: &'a str,
}

/// The non-empty lines of a rule; a line with no name is an RRULE, as dateutil (and so
/// Prefect) reads it.
fn content_lines(rule: &str) -> impl Iterator<Item = ContentLine<'_>> {
    rule.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|text| match text.split_once(':') {
            Some((name_params, value)) => {
                let (name, params) = name_params.split_once(';').unwrap_or((name_params, ""));
                ContentLine {
                    name: name.to_ascii_uppercase(),
                    params,
                    value,
                    text,
                }
            }
            None => ContentLine {
                name: "RRULE".into(),
                params: "",
                value: text,
                text,
            },
        })
}

/// The rule with every date written as UTC, and Prefect's default DTSTART
/// (2020-01-01 00:00) where it has none.
fn wall_clock(rule: &str) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut has_start = false;
    for line in content_lines(rule) {
        let name = line.name.as_str();
        match name {
            "DTSTART" | "RDATE" | "EXDATE" => {
                has_start |= name == "DTSTART";
                let values: Vec<String> = line.value.split(',').map(as_utc_value).collect();
                lines.push(format!("{name}:{}", values.join(",")));
            }
            "RRULE" | "EXRULE" => {
                let parts: Vec<String> = line
                    .value
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
            _ => lines.push(line.text.to_string()),
        }
    }
    if !has_start {
        lines.insert(0, "DTSTART:20200101T000000Z".to_string());
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

/// Seconds in one period of a rule, when every period has the same length.
fn period(r: &RRule) -> Option<i64> {
    let unit = match r.get_freq() {
        Frequency::Secondly => 1,
        Frequency::Minutely => 60,
        Frequency::Hourly => 3600,
        Frequency::Daily => 86_400,
        Frequency::Weekly => 604_800,
        Frequency::Monthly | Frequency::Yearly => return None,
    };
    Some(unit * i64::from(r.get_interval().max(1)))
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A DTSTART as close before `target` as the rules allow: moved forward by whole common
/// periods, which yields the same future occurrences without walking the past. Not for
/// rules with COUNT (which counts from the real start) or calendar-month frequencies.
fn advanced_start(set: &RRuleSet, target: NaiveDateTime) -> NaiveDateTime {
    let start = set.get_dt_start().naive_utc();
    let mut common: i64 = 1;
    let mut until: Option<NaiveDateTime> = None;
    for r in set.get_rrule() {
        if r.get_count().is_some() {
            return start;
        }
        let Some(p) = period(r) else { return start };
        common = match (common / gcd(common, p)).checked_mul(p) {
            // Past a year of seconds the walk is short anyway.
            Some(l) if l <= 366 * 86_400 => l,
            _ => return start,
        };
        if let Some(u) = r.get_until() {
            let u = u.naive_utc();
            until = Some(until.map_or(u, |x| x.min(u)));
        }
    }
    let target = until.map_or(target, |u| u.min(target));
    let elapsed = (target - start).num_seconds();
    if elapsed <= 0 {
        return start;
    }
    start
        .checked_add_signed(TimeDelta::seconds(elapsed / common * common))
        .unwrap_or(start)
}

fn utc(t: NaiveDateTime) -> DateTime<rrule::Tz> {
    t.and_utc().with_timezone(&rrule::Tz::UTC)
}

/// The next `n` runs at or after `after`. Every occurrence looked at, before or after
/// `after`, is one step of `budget`.
pub fn runs(
    rule: &Rule,
    tz: Tz,
    after: DateTime<Utc>,
    n: usize,
    budget: &mut Budget,
) -> Result<Vec<DateTime<Tz>>, NoRuns> {
    let after_local = after.with_timezone(&tz).naive_local();
    // Resolving a gap moves a time by at most a few hours.
    let window = after_local
        .checked_sub_signed(TimeDelta::hours(3))
        .unwrap_or(NaiveDateTime::MIN);
    let target = window
        .checked_sub_signed(TimeDelta::hours(1))
        .unwrap_or(NaiveDateTime::MIN);
    let start = utc(advanced_start(&rule.set, target));
    let set = &rule.set;
    // The crate's limit stops a rule that goes 100,000 periods without an occurrence.
    let main = RRuleSet::new(start)
        .set_rrules(set.get_rrule().clone())
        .set_rdates(set.get_rdate().clone())
        .set_exdates(set.get_exdate().clone())
        .limit();
    let mut out: Vec<DateTime<Tz>> = Vec::new();
    let mut ended = true;
    for t in &main {
        budget.spend(1)?;
        let wall = t.naive_utc();
        if wall < window {
            continue;
        }
        let Some(t) = resolve_backward(tz, wall) else {
            break;
        };
        if t >= after && !out.contains(&t) {
            out.push(t);
            if out.len() >= n {
                ended = false;
                break;
            }
        }
    }
    // A rule without COUNT or UNTIL only stops early when the crate's limit stopped it.
    let unbounded = set
        .get_rrule()
        .iter()
        .any(|r| r.get_count().is_none() && r.get_until().is_none());
    if ended && out.len() < n && unbounded {
        return Err(NoRuns::Sparse);
    }
    out.sort();
    Ok(out)
}
