//! What a run tells the DBA as it goes, in the runbook's shape
//! (`[public.incidents.title] batch 412/2000 — rotated 500 rows; 41200 rows/s, about 3 min left`):
//! a line for each of the first batches, then at most one every few seconds (a million-row table
//! does not flood psql), always the last; the rate over the last batches and the time left at
//! that rate once the run has lasted long enough for a rate to mean something; at the end, the
//! elapsed time and the average rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Every batch gets its line up to this many.
const FIRST_LINES: i64 = 10;
/// After them, at most one line per this long.
const EVERY: Duration = Duration::from_secs(5);
/// The rate is measured over this many recent batches.
const WINDOW: usize = 10;
/// No rate, time left or elapsed time before the run has lasted this long.
const MIN_ELAPSED: Duration = Duration::from_secs(1);

pub struct Progress {
    started: Instant,
    last_line: Option<Instant>,
    /// (when, rows done by then) at the end of each recent batch, the start included.
    recent: VecDeque<(Instant, i64)>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new(Instant::now())
    }
}

impl Progress {
    pub fn new(started: Instant) -> Progress {
        Progress {
            started,
            last_line: None,
            recent: VecDeque::from([(started, 0)]),
        }
    }

    /// Records the end of a batch (`done` rows so far of about `planned`); returns the text to
    /// append to its line, or None when this batch gets no line.
    pub fn batch(&mut self, now: Instant, batches: i64, done: i64, planned: i64) -> Option<String> {
        self.recent.push_back((now, done));
        if self.recent.len() > WINDOW + 1 {
            self.recent.pop_front();
        }
        let last = done >= planned;
        let due = self
            .last_line
            .is_none_or(|t| now.duration_since(t) >= EVERY);
        if !(batches <= FIRST_LINES || last || due) {
            return None;
        }
        self.last_line = Some(now);
        if now.duration_since(self.started) < MIN_ELAPSED {
            return Some(String::new());
        }
        let rate = self.rate();
        Some(match rate {
            Some(r) if planned > done => {
                let left = (planned - done) as f64 / r;
                format!("; {} rows/s, about {} left", r.round(), duration(left))
            }
            Some(r) => format!("; {} rows/s", r.round()),
            None => String::new(),
        })
    }

    /// Rows per second over the recent batches.
    fn rate(&self) -> Option<f64> {
        let (t0, d0) = *self.recent.front()?;
        let (t1, d1) = *self.recent.back()?;
        let secs = t1.duration_since(t0).as_secs_f64();
        (secs > 0.0 && d1 > d0).then(|| (d1 - d0) as f64 / secs)
    }

    /// What the final line says of time: ` (12.4 s, 229 rows/s)`, or nothing for a short run.
    pub fn summary(&self, now: Instant, done: i64) -> String {
        let secs = now.duration_since(self.started).as_secs_f64();
        if now.duration_since(self.started) < MIN_ELAPSED {
            return String::new();
        }
        let rate = if done > 0 {
            format!(", {} rows/s", (done as f64 / secs).round())
        } else {
            String::new()
        };
        format!(" ({}{rate})", duration(secs))
    }
}

/// A duration as a person says it: `42 s`, `3 min`, `2 h 5 min`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 if secs < 10.0 => format!("{:.1} s", secs.max(0.0)),
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", (s + 30) / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600 + 30) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p: &Progress, secs: f64) -> Instant {
        p.started + Duration::from_secs_f64(secs)
    }

    #[test]
    fn the_first_batches_each_get_a_line_then_one_every_few_seconds_and_always_the_last() {
        let mut p = Progress::default();
        let mut lines = Vec::new();
        // 2000 batches of 500 rows, one every 10 ms: 20 s in all.
        for b in 1..=2000i64 {
            let now = at(&p, b as f64 * 0.01);
            if p.batch(now, b, b * 500, 2000 * 500).is_some() {
                lines.push(b);
            }
        }
        assert_eq!(&lines[..10], &(1..=10).collect::<Vec<_>>()[..]);
        assert_eq!(*lines.last().unwrap(), 2000);
        // After the first ten: one line per 5 s (about 4 in 20 s), plus the last.
        assert!(lines.len() <= 10 + 4 + 1, "{lines:?}");
        assert!(lines.len() >= 10 + 3, "{lines:?}");
    }

    #[test]
    fn rate_and_time_left_once_the_run_has_lasted_a_second() {
        let mut p = Progress::default();
        // Short so far: a line, nothing about time.
        assert_eq!(p.batch(at(&p, 0.5), 1, 500, 10_000).as_deref(), Some(""));
        // 1000 rows/s over the window: 8500 rows left, about 8.5 s.
        let line = p.batch(at(&p, 1.5), 2, 1500, 10_000).unwrap();
        assert_eq!(line, "; 1000 rows/s, about 8.5 s left");
        // Done: the rate, no time left.
        let line = p.batch(at(&p, 10.0), 3, 10_000, 10_000).unwrap();
        assert!(
            line.starts_with("; 1000 rows/s") && !line.contains("left"),
            "{line}"
        );
        assert_eq!(p.summary(at(&p, 10.0), 10_000), " (10 s, 1000 rows/s)");
        assert_eq!(Progress::default().summary(Instant::now(), 5), "");
    }

    #[test]
    fn the_rate_follows_the_recent_batches() {
        let mut p = Progress::default();
        // Fast at first (10,000 rows/s), then slow (100 rows/s): after a full window of slow
        // batches the rate says so.
        let mut t = 0.0;
        let mut done = 0;
        for b in 1..=5 {
            t += 0.05;
            done += 500;
            p.batch(at(&p, t), b, done, 1_000_000);
        }
        for b in 6..=5 + WINDOW as i64 {
            t += 5.0;
            done += 500;
            p.batch(at(&p, t), b, done, 1_000_000);
        }
        let line = p.batch(at(&p, t + 5.0), 99, done + 500, 1_000_000).unwrap();
        assert!(line.starts_with("; 100 rows/s"), "{line}");
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(duration(0.04), "0.0 s");
        assert_eq!(duration(8.52), "8.5 s");
        assert_eq!(duration(42.4), "42 s");
        assert_eq!(duration(89.0), "1 min");
        assert_eq!(duration(91.0), "2 min");
        assert_eq!(duration(3599.0), "60 min");
        assert_eq!(duration(7530.0), "2 h 6 min");
    }
}
