//! The time language of Prefect schedules, pure and in one place: cron, interval and
//! rrule rules, time zones, and the next runs each makes, computed the way Prefect's
//! scheduler computes them. Validation parses with it; the next-run preview runs it.
//!
//! Every walk through time here spends a [`Budget`] of steps and wall time, so a rule
//! that would take millions of steps to reach its next run stops and says so instead of
//! holding up the reconcile of other resources.

pub mod cron;
pub mod interval;
pub mod rrule;
pub mod zone;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// Checks at most this many candidate times per schedule (Prefect checks 1000).
const MAX_CANDIDATES: usize = 1000;

/// A schedule's rule, parsed.
#[derive(Debug, Clone)]
pub enum Rule {
    Cron(cron::Cron),
    /// `anchor`: where the manifest anchored the series; `None` lets Prefect choose.
    Interval {
        every: interval::Every,
        anchor: Option<DateTime<chrono::FixedOffset>>,
    },
    RRule(rrule::Rule),
}

/// Steps and time a computation may still take.
#[derive(Debug, Clone)]
pub struct Budget {
    steps: u64,
    deadline: Instant,
    spent: u64,
}

/// The budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

impl Budget {
    pub fn new(steps: u64, time: Duration) -> Budget {
        Budget::until(steps, Instant::now() + time)
    }

    /// `steps` steps, and time until `deadline` (shared by the schedules of a resource).
    pub fn until(steps: u64, deadline: Instant) -> Budget {
        Budget {
            steps,
            deadline,
            spent: 0,
        }
    }

    /// Takes `n` steps; the clock is read every 1024 steps.
    pub fn spend(&mut self, n: u64) -> Result<(), Exhausted> {
        if self.steps < n {
            self.steps = 0;
            return Err(Exhausted);
        }
        self.steps -= n;
        let before = self.spent;
        self.spent += n;
        if before >> 10 != self.spent >> 10 && Instant::now() >= self.deadline {
            self.steps = 0;
            return Err(Exhausted);
        }
        Ok(())
    }

    /// The steps taken so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }
}

/// Why a schedule shows no next runs although it has some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRuns {
    /// The step or time budget ran out before the next runs were found.
    Budget,
    /// The rule went more periods without an occurrence than the search allows.
    Sparse,
}

impl From<Exhausted> for NoRuns {
    fn from(_: Exhausted) -> Self {
        NoRuns::Budget
    }
}

impl NoRuns {
    pub fn message(self) -> &'static str {
        match self {
            NoRuns::Budget => "next runs not shown: finding them takes more steps than the preview allows (a rule that fires rarely, or an anchor_date far in the past); Prefect schedules it as usual",
            NoRuns::Sparse => "next runs not shown: the rule went 100,000 periods without an occurrence, further than the preview searches",
        }
    }
}

/// The next `n` runs at or after `after` of `rule` in zone `tz`. `anchor` is where the
/// series of an interval schedule without its own anchor_date is anchored (what Prefect
/// chose); without one, an interval schedule has no preview.
pub fn next_runs(
    rule: &Rule,
    tz: Tz,
    anchor: Option<DateTime<Utc>>,
    after: DateTime<Utc>,
    n: usize,
    budget: &mut Budget,
) -> Result<Vec<DateTime<Tz>>, NoRuns> {
    match rule {
        Rule::Cron(c) => Ok(cron::runs(c, tz, after, n, budget)?),
        Rule::RRule(r) => rrule::runs(r, tz, after, n, budget),
        Rule::Interval { every, anchor: own } => {
            match own.map(|a| a.with_timezone(&Utc)).or(anchor) {
                Some(a) => Ok(interval::runs(*every, a, tz, after, n, budget)?),
                None => Ok(Vec::new()),
            }
        }
    }
}
