//! Calendar schedules in the Proxmox/systemd style admins already type:
//! [`Calendar`] (weekly windows such as `mon..fri 22:00-06:00` or
//! `sat,sun`), and [`RateSchedule`] (a bandwidth limit that depends on the
//! time of day: first matching rule wins).
//!
//! Everything here is evaluated on local civil time ([`jiff`], with the
//! system time zone: `TZ` or `/etc/localtime`), and is pure: every check
//! takes the time it is asked about, so tests use fixed times and zones.
//!
//! Grammar of a calendar (case-insensitive):
//! - `SPAN[; SPAN ...]`: inside when any span is;
//! - `SPAN` is `[DAYS] [FROM-TO]` (at least one of them);
//! - `DAYS` is a comma list of `mon`..`sun` (full names too) and ranges
//!   `mon..fri` (may wrap: `fri..mon`); no days: every day;
//! - `FROM-TO` is `H[:MM[:SS]]-H[:MM[:SS]]`, `TO` may be `24:00`; a span
//!   that wraps midnight (`22:00-06:00`) belongs to the day it starts on
//!   (`fri 22:00-06:00` includes Saturday 05:00, not Friday 05:00);
//!   no times: the whole day;
//! - `always` (or `any`); the earlier forms `HH:MM-HH:MM+weekends` and
//!   `default` / `off-hours` (= `18:00-08:00; sat,sun`) still parse.

use jiff::civil::{DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{ToSpan, Zoned};

/// Seconds in a day.
const DAY: u32 = 86_400;
/// Every weekday (bit 0 = Sunday ... bit 6 = Saturday).
const ALL_DAYS: u8 = 0x7f;
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Why a calendar is refused by [`Calendar::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    #[error("{0:?} is not a schedule: use [DAYS] [HH:MM-HH:MM] (e.g. `mon..fri 22:00-06:00`, `sat,sun`, `08:00-18:00`; local time, may wrap midnight), several joined with `;`, or `always`")]
    Syntax(String),
    #[error(
        "{0:?} is not a day: use mon, tue, wed, thu, fri, sat, sun or a range such as mon..fri"
    )]
    Day(String),
    #[error("{0:?} is not a time of day: use H, HH:MM or HH:MM:SS (00:00 to 24:00)")]
    Time(String),
    #[error("{0:?}: start and end are equal; say `always` for no restriction")]
    Empty(String),
}

/// The kinds of [`CalendarError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarErrorKind {
    Syntax,
    Day,
    Time,
    Empty,
}

impl CalendarError {
    pub fn kind(&self) -> CalendarErrorKind {
        match self {
            CalendarError::Syntax(_) => CalendarErrorKind::Syntax,
            CalendarError::Day(_) => CalendarErrorKind::Day,
            CalendarError::Time(_) => CalendarErrorKind::Time,
            CalendarError::Empty(_) => CalendarErrorKind::Empty,
        }
    }
}

/// One `[DAYS] [FROM-TO]` span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// Days it starts on (bit 0 = Sunday).
    days: u8,
    /// Seconds after midnight; `start == end` (only from a span without
    /// times): the whole day.
    start: u32,
    end: u32,
}

impl Span {
    fn whole_day(days: u8) -> Span {
        Span {
            days,
            start: 0,
            end: 0,
        }
    }

    fn on(&self, weekday: u8) -> bool {
        self.days & (1 << weekday) != 0
    }

    /// Inside at `secs` after midnight on `weekday` (0 = Sunday)?
    fn contains(&self, weekday: u8, secs: u32) -> bool {
        let yesterday = (weekday + 6) % 7;
        if self.start == self.end {
            self.on(weekday)
        } else if self.start < self.end {
            self.on(weekday) && (self.start..self.end).contains(&secs)
        } else {
            (self.on(weekday) && secs >= self.start) || (self.on(yesterday) && secs < self.end)
        }
    }
}

/// A weekly calendar of local-time windows (see the module doc for the
/// grammar). `Default` is "outside office hours": 18:00-08:00 every day
/// and all of Saturday and Sunday.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    spans: Vec<Span>,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar {
            spans: vec![
                Span {
                    days: ALL_DAYS,
                    start: 18 * 3600,
                    end: 8 * 3600,
                },
                Span::whole_day(1 | 1 << 6),
            ],
        }
    }
}

impl Calendar {
    /// Always inside.
    pub fn always() -> Self {
        Calendar {
            spans: vec![Span::whole_day(ALL_DAYS)],
        }
    }

    /// Parse a calendar (module doc).
    pub fn parse(s: &str) -> Result<Calendar, CalendarError> {
        let s = s.trim();
        let l = s.to_ascii_lowercase();
        match l.as_str() {
            "always" | "any" => return Ok(Calendar::always()),
            "default" | "off-hours" => return Ok(Calendar::default()),
            _ => {}
        }
        if let Some(span) = l.strip_suffix("+weekends") {
            let mut c = Calendar::parse(span)?;
            c.spans.push(Span::whole_day(1 | 1 << 6));
            return Ok(c);
        }
        let mut spans = Vec::new();
        for part in l.split(';') {
            spans.push(parse_span(part.trim(), s)?);
        }
        Ok(Calendar { spans })
    }

    /// Inside at local civil time `t`?
    pub fn contains(&self, t: DateTime) -> bool {
        let wd = t.weekday().to_sunday_zero_offset() as u8;
        let secs = secs_of(t.time());
        self.spans.iter().any(|s| s.contains(wd, secs))
    }

    /// Inside now (system time zone)?
    pub fn open_now(&self) -> bool {
        self.contains(Zoned::now().datetime())
    }

    /// The first instant after `now` at which [`contains`](Self::contains)
    /// changes, within the next eight days (in `now`'s time zone; a civil
    /// boundary that falls in a DST gap moves forward, as local clocks
    /// do). `None`: it never changes.
    pub fn next_change(&self, now: &Zoned) -> Option<Zoned> {
        let tz = now.time_zone();
        let inside = self.contains(now.datetime());
        let mut cands: Vec<Zoned> = Vec::new();
        for d in -1i64..=8 {
            let Ok(date) = now.date().checked_add(d.days()) else {
                continue;
            };
            for s in &self.spans {
                for b in [s.start, s.end] {
                    let dt = date.to_datetime(Time::midnight());
                    let Ok(dt) = dt.checked_add((b as i64).seconds()) else {
                        continue;
                    };
                    if let Ok(z) = at(tz, dt) {
                        if z > *now {
                            cands.push(z);
                        }
                    }
                }
            }
        }
        // Civil time also jumps at the zone's transitions (a window whose
        // edge falls in a DST gap changes state when the gap ends).
        let horizon = now
            .timestamp()
            .checked_add((9i64 * 24).hours())
            .unwrap_or(jiff::Timestamp::MAX);
        cands.extend(
            tz.following(now.timestamp())
                .take_while(|t| t.timestamp() <= horizon)
                .map(|t| t.timestamp().to_zoned(tz.clone())),
        );
        cands.sort();
        cands
            .into_iter()
            .find(|c| self.contains(c.datetime()) != inside)
    }
}

fn at(tz: &TimeZone, dt: DateTime) -> Result<Zoned, jiff::Error> {
    tz.to_ambiguous_zoned(dt).compatible()
}

fn secs_of(t: Time) -> u32 {
    t.hour() as u32 * 3600 + t.minute() as u32 * 60 + t.second() as u32
}

/// `[DAYS] [FROM-TO]`; `whole` is the full text for errors.
fn parse_span(part: &str, whole: &str) -> Result<Span, CalendarError> {
    let words: Vec<&str> = part.split_whitespace().collect();
    let (days, times) = match words.as_slice() {
        [] => return Err(CalendarError::Syntax(whole.to_string())),
        [one]
            if one.contains(':')
                || one.contains('-')
                || one.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            (None, Some(*one))
        }
        [one] => (Some(*one), None),
        [d, t] => (Some(*d), Some(*t)),
        _ => return Err(CalendarError::Syntax(whole.to_string())),
    };
    let days = match days {
        Some(d) => parse_days(d)?,
        None => ALL_DAYS,
    };
    let Some(times) = times else {
        return Ok(Span::whole_day(days));
    };
    let (a, b) = times
        .split_once('-')
        .ok_or_else(|| CalendarError::Syntax(whole.to_string()))?;
    let (start, end) = (parse_time(a)?, parse_time(b)?);
    if start == DAY {
        return Err(CalendarError::Time(a.to_string()));
    }
    let end = if end == DAY { 0 } else { end };
    if start == end && !(start == 0 && b.starts_with("24")) {
        return Err(CalendarError::Empty(whole.to_string()));
    }
    Ok(Span { days, start, end })
}

/// `mon,wed..fri` as a day mask.
fn parse_days(s: &str) -> Result<u8, CalendarError> {
    let mut mask = 0u8;
    for item in s.split(',') {
        let day = |d: &str| -> Result<u8, CalendarError> {
            let d = d.trim();
            (0..7u8)
                .find(|&i| d == DAY_NAMES[i as usize] || d == FULL[i as usize])
                .ok_or_else(|| CalendarError::Day(d.to_string()))
        };
        match item.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut i = a;
                loop {
                    mask |= 1 << i;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => mask |= 1 << day(item)?,
        }
    }
    Ok(mask)
}

const FULL: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];

/// `H`, `H:MM` or `H:MM:SS` as seconds after midnight (24:00 allowed).
fn parse_time(s: &str) -> Result<u32, CalendarError> {
    let bad = || CalendarError::Time(s.to_string());
    let mut it = s.trim().split(':');
    let mut num = |max: u32| -> Result<Option<u32>, CalendarError> {
        match it.next() {
            None => Ok(None),
            Some(x) if !x.is_empty() && x.len() <= 2 && x.bytes().all(|c| c.is_ascii_digit()) => {
                let v: u32 = x.parse().map_err(|_| bad())?;
                if v > max {
                    return Err(bad());
                }
                Ok(Some(v))
            }
            Some(_) => Err(bad()),
        }
    };
    let h = num(24)?.ok_or_else(bad)?;
    let m = num(59)?.unwrap_or(0);
    let sec = num(59)?.unwrap_or(0);
    if it.next().is_some() {
        return Err(bad());
    }
    let t = h * 3600 + m * 60 + sec;
    if t > DAY {
        return Err(bad());
    }
    Ok(t)
}

impl std::fmt::Display for Calendar {
    /// The canonical text (parses back to the same calendar).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Calendar::always() {
            return write!(f, "always");
        }
        let mut parts = Vec::new();
        for s in &self.spans {
            let mut p = String::new();
            if s.days != ALL_DAYS {
                p.push_str(&days_text(s.days));
            }
            if s.start != s.end {
                if !p.is_empty() {
                    p.push(' ');
                }
                p.push_str(&format!("{}-{}", hms(s.start), hms(s.end)));
            }
            if p.is_empty() {
                p.push_str("always");
            }
            parts.push(p);
        }
        write!(f, "{}", parts.join("; "))
    }
}

fn hms(t: u32) -> String {
    let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
    if s == 0 {
        format!("{h:02}:{m:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// Day mask as `mon..fri,sun`-style text (runs from Monday).
fn days_text(mask: u8) -> String {
    // Monday-first order, so `mon..fri` and `sat,sun` read naturally.
    let order = [1u8, 2, 3, 4, 5, 6, 0];
    let mut out = Vec::new();
    let mut i = 0;
    while i < 7 {
        if mask & (1 << order[i]) == 0 {
            i += 1;
            continue;
        }
        let mut j = i;
        while j + 1 < 7 && mask & (1 << order[j + 1]) != 0 {
            j += 1;
        }
        let (a, b) = (DAY_NAMES[order[i] as usize], DAY_NAMES[order[j] as usize]);
        out.push(match j - i {
            0 => a.to_string(),
            1 => format!("{a},{b}"),
            _ => format!("{a}..{b}"),
        });
        i = j + 1;
    }
    out.join(",")
}

// A calendar travels (mount options from the supervisor to its worker) as
// its text, which parses back to the same calendar.
impl serde::Serialize for Calendar {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Calendar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Calendar::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One rule of a [`RateSchedule`]: a rate, when its calendar matches
/// (`None`: always).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateRule {
    pub when: Option<Calendar>,
    /// Bytes per second (0: unlimited).
    pub rate: u64,
}

/// A bandwidth limit by time of day: the first rule whose calendar
/// matches gives the rate; none matches: unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct RateSchedule {
    pub rules: Vec<RateRule>,
}

impl RateSchedule {
    /// One rate at all times.
    pub fn constant(rate: u64) -> Self {
        RateSchedule {
            rules: vec![RateRule { when: None, rate }],
        }
    }

    /// The rate at local civil time `t` (bytes/s, 0: unlimited).
    pub fn rate_at(&self, t: DateTime) -> u64 {
        self.rules
            .iter()
            .find(|r| r.when.as_ref().is_none_or(|c| c.contains(t)))
            .map_or(0, |r| r.rate)
    }

    /// The rate now (system time zone).
    pub fn rate_now(&self) -> u64 {
        self.rate_at(Zoned::now().datetime())
    }

    /// Does the rate depend on the time?
    pub fn is_timed(&self) -> bool {
        self.rules.iter().any(|r| r.when.is_some())
    }

    /// The next instant after `now` at which some rule's calendar changes
    /// (the rate may change then); `None`: never.
    pub fn next_change(&self, now: &Zoned) -> Option<Zoned> {
        self.rules
            .iter()
            .filter_map(|r| r.when.as_ref()?.next_change(now))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn dt(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> DateTime {
        date(y, mo, d).at(h, mi, 0, 0)
    }

    /// Schedules travel as JSON (supervisor to worker): every calendar
    /// form comes back equal, and a bad calendar is refused.
    #[test]
    fn schedules_round_trip_through_json() {
        for text in [
            "mon..fri 22:00-06:00",
            "sat,sun",
            "8-17:30",
            "fri..mon 20:00-23:00; sun",
            "18:00-08:00+weekends",
            "always",
        ] {
            let rs = RateSchedule {
                rules: vec![
                    RateRule {
                        when: Some(Calendar::parse(text).unwrap()),
                        rate: 10_000_000,
                    },
                    RateRule {
                        when: None,
                        rate: 0,
                    },
                ],
            };
            let json = serde_json::to_string(&rs).unwrap();
            let back: RateSchedule = serde_json::from_str(&json).unwrap();
            assert_eq!(back, rs, "{text} -> {json}");
        }
        let bad = r#"{"rules":[{"when":"someday 25:00","rate":1}]}"#;
        assert!(serde_json::from_str::<RateSchedule>(bad).is_err());
    }

    // 2026-03-02 is a Monday.
    #[test]
    fn weekday_window_across_midnight() {
        let c = Calendar::parse("mon..fri 22:00-06:00").unwrap();
        assert!(c.contains(dt(2026, 3, 2, 22, 0))); // Mon 22:00
        assert!(c.contains(dt(2026, 3, 3, 5, 59))); // Tue 05:59 (from Mon)
        assert!(!c.contains(dt(2026, 3, 3, 6, 0))); // Tue 06:00
        assert!(!c.contains(dt(2026, 3, 2, 5, 0))); // Mon 05:00: Sun not listed
        assert!(c.contains(dt(2026, 3, 7, 5, 0))); // Sat 05:00 (from Fri)
        assert!(!c.contains(dt(2026, 3, 7, 22, 0))); // Sat 22:00
        assert!(!c.contains(dt(2026, 3, 2, 21, 59)));
        assert_eq!(c.to_string(), "mon..fri 22:00-06:00");
    }

    #[test]
    fn days_only_and_alternatives() {
        let c = Calendar::parse("sat,sun").unwrap();
        assert!(c.contains(dt(2026, 3, 7, 12, 0)) && c.contains(dt(2026, 3, 8, 0, 0)));
        assert!(!c.contains(dt(2026, 3, 9, 0, 0)));
        let c = Calendar::parse("Mon,Wed..Thu 8-17:30; sunday").unwrap();
        assert!(c.contains(dt(2026, 3, 2, 8, 0)) && !c.contains(dt(2026, 3, 3, 9, 0)));
        assert!(c.contains(dt(2026, 3, 5, 17, 29)) && !c.contains(dt(2026, 3, 5, 17, 30)));
        assert!(c.contains(dt(2026, 3, 8, 3, 0)));
        assert_eq!(c.to_string(), "mon,wed,thu 08:00-17:30; sun");
        assert_eq!(Calendar::parse(&c.to_string()).unwrap(), c);
        let c = Calendar::parse("fri..mon").unwrap();
        assert_eq!(c.to_string(), "mon,fri..sun");
        let c = Calendar::parse("12:00-24:00").unwrap();
        assert!(c.contains(dt(2026, 3, 2, 23, 59)) && !c.contains(dt(2026, 3, 3, 0, 0)));
    }

    #[test]
    fn legacy_forms() {
        let w = Calendar::default();
        assert_eq!(Calendar::parse("18:00-08:00+weekends").unwrap(), w);
        assert_eq!(Calendar::parse("default").unwrap(), w);
        assert_eq!(w.to_string(), "18:00-08:00; sat,sun");
        assert_eq!(Calendar::parse(&w.to_string()).unwrap(), w);
        assert!(w.contains(dt(2026, 3, 4, 18, 0)) && w.contains(dt(2026, 3, 4, 2, 0)));
        assert!(!w.contains(dt(2026, 3, 4, 8, 0)) && !w.contains(dt(2026, 3, 2, 12, 0)));
        assert!(w.contains(dt(2026, 3, 7, 12, 0)) && w.contains(dt(2026, 3, 8, 12, 0)));
        assert!(Calendar::parse("always")
            .unwrap()
            .contains(dt(2026, 3, 4, 11, 0)));
        assert_eq!(Calendar::always().to_string(), "always");
    }

    #[test]
    fn refused() {
        use CalendarErrorKind as K;
        let k = |s: &str| Calendar::parse(s).unwrap_err().kind();
        assert_eq!(k("25:00-01:00"), K::Time);
        assert_eq!(k("10:61-11:00"), K::Time);
        assert_eq!(k("10:00-10:00"), K::Empty);
        assert_eq!(k("mon..fryday 10:00-11:00"), K::Day);
        assert_eq!(k("mo"), K::Day);
        assert_eq!(k("mon 10:00"), K::Syntax);
        assert_eq!(k(""), K::Syntax);
        assert_eq!(k("mon 1-2 3-4"), K::Syntax);
        assert_eq!(k("mon;"), K::Syntax);
    }

    #[test]
    fn next_change_across_dst() {
        // Europe/Berlin springs forward on 2026-03-29 at 02:00 -> 03:00.
        // Central European rules as a POSIX TZ string (no tzdb needed).
        let tz = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let c = Calendar::parse("01:00-02:30").unwrap();
        let now = at(&tz, dt(2026, 3, 29, 0, 30)).unwrap();
        let open = c.next_change(&now).unwrap();
        assert_eq!(open.datetime(), dt(2026, 3, 29, 1, 0));
        // 02:30 does not exist that day: the window closes at 03:00 local
        // (one real hour after opening).
        let close = c.next_change(&open).unwrap();
        assert_eq!(close.datetime(), dt(2026, 3, 29, 3, 0));
        assert!(!c.contains(close.datetime()));
        assert_eq!(
            close.timestamp().as_second() - open.timestamp().as_second(),
            3600
        );
        // Falls back on 2026-10-25 at 03:00 -> 02:00: a 22:00-06:00 window
        // lasts nine real hours that night.
        let c = Calendar::parse("sat 22:00-06:00").unwrap();
        let now = at(&tz, dt(2026, 10, 24, 12, 0)).unwrap();
        let open = c.next_change(&now).unwrap();
        let close = c.next_change(&open).unwrap();
        assert_eq!(open.datetime(), dt(2026, 10, 24, 22, 0));
        assert_eq!(close.datetime(), dt(2026, 10, 25, 6, 0));
        assert_eq!(
            close.timestamp().as_second() - open.timestamp().as_second(),
            9 * 3600
        );
        assert!(Calendar::always().next_change(&now).is_none());
    }

    #[test]
    fn rate_schedule_first_match_wins() {
        let s = RateSchedule {
            rules: vec![
                RateRule {
                    when: Some(Calendar::parse("mon..fri 08:00-18:00").unwrap()),
                    rate: 10_000_000,
                },
                RateRule {
                    when: Some(Calendar::parse("08:00-20:00").unwrap()),
                    rate: 50_000_000,
                },
                RateRule {
                    when: None,
                    rate: 100_000_000,
                },
            ],
        };
        assert_eq!(s.rate_at(dt(2026, 3, 2, 9, 0)), 10_000_000);
        assert_eq!(s.rate_at(dt(2026, 3, 2, 19, 0)), 50_000_000);
        assert_eq!(s.rate_at(dt(2026, 3, 7, 9, 0)), 50_000_000);
        assert_eq!(s.rate_at(dt(2026, 3, 2, 23, 0)), 100_000_000);
        assert!(s.is_timed() && !RateSchedule::constant(5).is_timed());
        let no_default = RateSchedule {
            rules: s.rules[..1].to_vec(),
        };
        assert_eq!(no_default.rate_at(dt(2026, 3, 2, 23, 0)), 0);
        let tz = TimeZone::UTC;
        let now = at(&tz, dt(2026, 3, 2, 17, 0)).unwrap();
        assert_eq!(
            s.next_change(&now).unwrap().datetime(),
            dt(2026, 3, 2, 18, 0)
        );
        assert!(RateSchedule::constant(5).next_change(&now).is_none());
    }
}
