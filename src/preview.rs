//! Pure: the next-run preview that status shows, from the validated schedules. Each
//! schedule gets a step budget and the resource a time budget, so a rule that cannot
//! reach its next runs quickly shows a note saying so instead of holding up the pass.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::api::ScheduleStatus;
use crate::observed::ObservedSchedule;
use crate::schedule::{self, Budget, Rule};
use crate::validate::ValidSchedule;

/// How many upcoming runs status shows per schedule.
pub const RUNS_SHOWN: usize = 3;
/// Steps one schedule's preview may take (a cron day, an interval step, an rrule
/// occurrence): about 20-50 ms of one core at most.
pub const STEPS_PER_SCHEDULE: u64 = 200_000;
/// Wall time the previews of one resource may take together.
pub const TIME_PER_RESOURCE: Duration = Duration::from_millis(250);

/// The status preview of a deployment's schedules: for each schedule its next
/// `RUNS_SHOWN` runs after `now` (or a note saying why none are shown), and the earliest
/// of all. An interval schedule without anchor_date is anchored where Prefect anchored
/// it (`seen`: the schedules Prefect reported), else on the first run shown before
/// (`previous`), which is a point of the same series.
pub fn schedules_preview(
    schedules: &[ValidSchedule],
    paused: bool,
    seen: &[ObservedSchedule],
    previous: &[ScheduleStatus],
    now: DateTime<Utc>,
) -> (Vec<ScheduleStatus>, Option<String>) {
    let deadline = Instant::now() + TIME_PER_RESOURCE;
    let mut out = Vec::new();
    let mut earliest: Option<DateTime<Tz>> = None;
    for s in schedules {
        let mut status = ScheduleStatus {
            slug: s.slug.clone(),
            ..Default::default()
        };
        if !paused && s.active {
            let anchor = match &s.rule {
                Rule::Interval { anchor: None, .. } => chosen_anchor(&s.slug, seen, previous),
                _ => None,
            };
            let mut budget = Budget::until(STEPS_PER_SCHEDULE, deadline);
            match schedule::next_runs(&s.rule, s.tz, anchor, now, RUNS_SHOWN, &mut budget) {
                Ok(runs) => {
                    if let Some(first) = runs.first() {
                        if earliest.is_none_or(|e| first < &e) {
                            earliest = Some(*first);
                        }
                    }
                    status.next_runs = runs.iter().map(schedule::zone::format).collect();
                }
                Err(why) => status.note = Some(why.message().to_string()),
            }
        }
        out.push(status);
    }
    (out, earliest.as_ref().map(schedule::zone::format))
}

/// The anchor Prefect chose for an interval schedule sent without one.
fn chosen_anchor(
    slug: &str,
    seen: &[ObservedSchedule],
    previous: &[ScheduleStatus],
) -> Option<DateTime<Utc>> {
    let parse = |s: &str| {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    };
    let from_prefect = seen
        .iter()
        .find(|s| s.slug.as_deref() == Some(slug))
        .and_then(ObservedSchedule::anchor_date)
        .and_then(parse);
    from_prefect.or_else(|| {
        previous
            .iter()
            .find(|p| p.slug == slug)
            .and_then(|p| p.next_runs.first())
            .and_then(|t| parse(t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The preview of one schedule given in manifest form.
    fn runs(schedule: Value, after: &str) -> Vec<String> {
        let mut s = schedule;
        s["slug"] = json!("s");
        let spec: crate::api::Schedule = serde_json::from_value(s).unwrap();
        let valid = crate::validate::schedule(&spec, "s").unwrap();
        let (list, _) = schedules_preview(&[valid], false, &[], &[], at(after));
        assert_eq!(list[0].note, None);
        list[0].next_runs.clone()
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
        let c = crate::schedule::cron::Cron::parse("0 0 31 2 *", true).unwrap();
        assert!(!c.ever_fires());
        let c = crate::schedule::cron::Cron::parse("0 0 29 2 1", false).unwrap();
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
