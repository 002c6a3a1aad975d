//! Where a command's time goes: a stopwatch that notes the end of each
//! named step, shown as `timing` in a command's `--json` (e.g. a domain
//! failover's share of the time to a running VM).

use std::time::Instant;

use serde::Serialize;

/// One finished step and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub ms: f64,
}

/// A stopwatch of named steps, started at [`Steps::start`].
#[derive(Debug, Clone, Serialize)]
pub struct Steps {
    /// The steps in the order they ended.
    pub steps: Vec<Step>,
    /// From the start to the end of the last step.
    pub total_ms: f64,
    #[serde(skip)]
    t0: Instant,
    #[serde(skip)]
    last: Instant,
}

fn ms(from: Instant, to: Instant) -> f64 {
    (to - from).as_secs_f64() * 1000.0
}

impl Steps {
    /// A stopwatch started now.
    pub fn start() -> Steps {
        Steps::since(Instant::now())
    }

    /// A stopwatch started at `t0` (e.g. the command's start).
    pub fn since(t0: Instant) -> Steps {
        Steps {
            steps: Vec::new(),
            total_ms: 0.0,
            t0,
            last: t0,
        }
    }

    /// Step `step` ended now (it began where the previous one ended).
    pub fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push(Step {
            step,
            ms: ms(self.last, now),
        });
        self.last = now;
        self.total_ms = ms(self.t0, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_to_the_total() {
        let t0 = Instant::now() - std::time::Duration::from_millis(5);
        let mut s = Steps::since(t0);
        s.done("a");
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.done("b");
        let names: Vec<&str> = s.steps.iter().map(|x| x.step).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(s.steps[0].ms >= 5.0 && s.steps[1].ms >= 2.0, "{s:?}");
        let sum: f64 = s.steps.iter().map(|x| x.ms).sum();
        assert!((sum - s.total_ms).abs() < 0.01, "{s:?}");
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["steps"][1]["step"], "b");
        assert!(v.get("t0").is_none());
    }
}
