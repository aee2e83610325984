//! Recurring schedules: cron expressions evaluated in an IANA time zone, and fixed `every`
//! intervals.
//!
//! A [`Cron`] is a Vixie-style expression with five fields (minute, hour, day of month, month,
//! day of week; the second is 0) or six (a leading seconds field), or one of the macros
//! `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and `@hourly`. When both
//! day fields are restricted a day matches if either does; when either day field starts with
//! `*` or `?` both must match (Vixie's rule, so `*/2` counts as unrestricted here). `L`, `W`
//! and `#` are rejected.
//!
//! Matching is done on the wall clock of a [`Zone`]: [`Cron::next_after`] walks matching local
//! date-times in increasing order and maps each to an instant:
//!
//! - a local time that exists once fires at that instant;
//! - a local time the clocks skip (spring forward) fires at the instant of the jump, and all
//!   the skipped times that match fire there once together;
//! - a local time the clocks repeat (fall back) fires once, at its first occurrence: the
//!   repeated minutes do not fire again on the second pass.
//!
//! The result is always strictly after the given instant, so calling `next_after` again with
//! the previous result yields strictly increasing fire times, each local time firing at most
//! once. Fire times are whole seconds. The search gives up after about five years of local
//! time, so an expression that can never match (`0 0 30 2 *`) returns `None` quickly.
//!
//! An `every` schedule ([`parse_every`], [`every_next_after`]) ignores time zones: it ticks at
//! `anchor + k × interval` instants.

use std::fmt;
use std::time::Duration;

use jiff::tz::{AmbiguousOffset, TimeZone};

use crate::timestamp::Timestamp;

/// The longest cron expression accepted, in characters.
pub const MAX_EXPRESSION_LEN: usize = 256;

/// How many years of local time [`Cron::next_after`] scans before giving up.
const HORIZON_YEARS: i32 = 5;

/// A field of a cron expression, as named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// Seconds, 0–59 (only in six-field expressions).
    Second,
    /// Minutes, 0–59.
    Minute,
    /// Hours, 0–23.
    Hour,
    /// Day of the month, 1–31.
    DayOfMonth,
    /// Month, 1–12 or JAN–DEC.
    Month,
    /// Day of the week, 0–7 (0 and 7 are Sunday) or SUN–SAT.
    DayOfWeek,
}

impl Field {
    /// The smallest value the field accepts.
    fn min(self) -> u32 {
        match self {
            Field::DayOfMonth | Field::Month => 1,
            _ => 0,
        }
    }

    /// The largest value the field accepts when written out.
    fn max(self) -> u32 {
        match self {
            Field::Second | Field::Minute => 59,
            Field::Hour => 23,
            Field::DayOfMonth => 31,
            Field::Month => 12,
            Field::DayOfWeek => 7,
        }
    }

    /// The end of `*` and of an open `a/n`: 6 for days of the week (7 is Sunday again).
    fn open_max(self) -> u32 {
        match self {
            Field::DayOfWeek => 6,
            other => other.max(),
        }
    }

    /// How many distinct values the field has: the largest step allowed.
    fn span(self) -> u32 {
        self.open_max() - self.min() + 1
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Field::Month => &[
                "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
            ],
            Field::DayOfWeek => &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
            _ => &[],
        }
    }

    /// What the field accepts, for error messages.
    fn accepts(self) -> String {
        let numbers = format!("a number {}–{}", self.min(), self.max());
        match self {
            Field::Month => format!("{numbers} or a month name JAN–DEC"),
            Field::DayOfWeek => format!("{numbers} or a day name SUN–SAT"),
            _ => numbers,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        })
    }
}

/// Why a cron expression, a time zone or an `every` interval was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CronError {
    /// The expression is empty or only whitespace.
    #[error("the cron expression is empty")]
    Empty,
    /// The expression is longer than [`MAX_EXPRESSION_LEN`].
    #[error("the cron expression is {length} characters long; at most {max} are allowed")]
    TooLong {
        /// Its length in characters.
        length: usize,
        /// The limit.
        max: usize,
    },
    /// Neither five nor six fields.
    #[error(
        "a cron expression has 5 fields (minute hour day-of-month month day-of-week) or 6 (a \
         leading second field), not {found}"
    )]
    FieldCount {
        /// How many whitespace-separated fields there were.
        found: usize,
    },
    /// An `@` word that is not a known macro.
    #[error(
        "unknown cron macro `{name}`; known: @yearly, @annually, @monthly, @weekly, @daily, \
         @midnight, @hourly"
    )]
    UnknownMacro {
        /// The text as written.
        name: String,
    },
    /// A number outside the field's range.
    #[error("the {field} field `{value}` is out of range {min}–{max}")]
    OutOfRange {
        /// The field.
        field: Field,
        /// The number as written.
        value: String,
        /// The smallest value allowed.
        min: u32,
        /// The largest value allowed.
        max: u32,
    },
    /// Neither a number nor a name the field accepts.
    #[error("the {field} field `{value}` is not {}", field.accepts())]
    NotANumber {
        /// The field.
        field: Field,
        /// The text as written.
        value: String,
    },
    /// A step of `/0`.
    #[error("the {field} field `{value}` has a step of zero")]
    StepZero {
        /// The field.
        field: Field,
        /// The list item as written.
        value: String,
    },
    /// A step larger than the number of values in the field.
    #[error(
        "the {field} field `{value}` has a step larger than {max}, the field's number of values"
    )]
    StepTooLarge {
        /// The field.
        field: Field,
        /// The list item as written.
        value: String,
        /// The largest step allowed.
        max: u32,
    },
    /// A range `a-b` with `a` after `b`.
    #[error("the {field} field `{value}` is a range whose start is after its end")]
    ReversedRange {
        /// The field.
        field: Field,
        /// The list item as written.
        value: String,
    },
    /// `L`, `W` or `#` (Quartz extensions).
    #[error(
        "the {field} field `{value}` uses `{feature}`, which is not supported (L, W and # are \
         not)"
    )]
    Unsupported {
        /// The field.
        field: Field,
        /// The list item as written.
        value: String,
        /// The unsupported character.
        feature: char,
    },
    /// `?` outside a day field, or not alone in its field.
    #[error(
        "`?` stands alone in the day-of-month or day-of-week field; the {field} field `{value}` \
         cannot use it"
    )]
    MisplacedQuestionMark {
        /// The field.
        field: Field,
        /// The field as written.
        value: String,
    },
    /// A list with an empty item (`1,,2`, `1,`).
    #[error("the {field} field `{value}` has an empty list item")]
    EmptyListItem {
        /// The field.
        field: Field,
        /// The field as written.
        value: String,
    },
    /// A name that is not in the IANA time zone database.
    #[error("unknown time zone `{name}`")]
    UnknownZone {
        /// The name as written.
        name: String,
    },
    /// An `every` interval under one second.
    #[error("the `every` interval `{text}` is under one second")]
    EveryTooShort {
        /// The interval as written.
        text: String,
    },
    /// An `every` interval that is not a duration.
    #[error(
        "cannot read `{text}` as a duration ({reason}); write numbers with units d, h, m, s or \
         ms, largest first, e.g. `30s`, `5m`, `1h30m`"
    )]
    BadDuration {
        /// The text as written.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A parsed cron expression. Each field is a bitset of the values it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    seconds: u64,
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    /// Vixie's rule: when either day field starts with `*` or `?`, a day must match both;
    /// otherwise either.
    days_either: bool,
}

impl Cron {
    /// Parses a standard five-field expression (minute hour day-of-month month day-of-week; the
    /// second is 0), a six-field one with a leading seconds field, or a macro such as `@daily`.
    /// Fields are separated by any whitespace.
    pub fn parse(expr: &str) -> Result<Cron, CronError> {
        let length = expr.chars().count();
        if length > MAX_EXPRESSION_LEN {
            return Err(CronError::TooLong {
                length,
                max: MAX_EXPRESSION_LEN,
            });
        }
        let text = expr.trim();
        if text.is_empty() {
            return Err(CronError::Empty);
        }
        let expanded = if text.starts_with('@') {
            expand_macro(text)?
        } else {
            text
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (second, rest) = match fields.as_slice() {
            [second, rest @ ..] if rest.len() == 5 => (Some(*second), rest),
            rest if rest.len() == 5 => (None, rest),
            other => return Err(CronError::FieldCount { found: other.len() }),
        };
        let seconds = match second {
            Some(field) => parse_field(field, Field::Second)?.0,
            None => 1,
        };
        let minutes = parse_field(rest[0], Field::Minute)?.0;
        let hours = parse_field(rest[1], Field::Hour)?.0;
        let (days_of_month, dom_open) = parse_field(rest[2], Field::DayOfMonth)?;
        let months = parse_field(rest[3], Field::Month)?.0;
        let (mut days_of_week, dow_open) = parse_field(rest[4], Field::DayOfWeek)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        Ok(Cron {
            text: text.to_owned(),
            seconds,
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            days_either: !dom_open && !dow_open,
        })
    }

    /// The expression as given to [`Cron::parse`], without surrounding whitespace.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first fire time strictly after `after`, matching on the wall clock of `zone` (see
    /// the module documentation for daylight-saving transitions). `None` when nothing matches
    /// within about five years (`0 0 30 2 *`) or the time is out of range.
    pub fn next_after(&self, after: Timestamp, zone: &Zone) -> Option<Timestamp> {
        let after = jiff::Timestamp::from_millisecond(after.as_millis()).ok()?;
        let tz = &zone.tz;
        // Every local time up to `after`'s own (whole second) first occurs at or before
        // `after`, so start one second later; later local times that still first occur at or
        // before `after` (the rest of a repeated hour) are skipped below.
        let mut from = Civil::from_jiff(tz.to_datetime(after)).plus_second();
        let last_year = from.year + HORIZON_YEARS;
        loop {
            let local = self.next_match(from, last_year)?;
            let dt = local.to_jiff()?;
            match tz.to_ambiguous_timestamp(dt).offset() {
                AmbiguousOffset::Unambiguous { offset } => {
                    let at = offset.to_timestamp(dt).ok()?;
                    if at > after {
                        return Some(Timestamp::from_millis(at.as_millisecond()));
                    }
                    from = local.plus_second();
                }
                AmbiguousOffset::Gap { after: later, .. } => {
                    // Before the jump with the new offset: the next transition is the jump.
                    let probe = later.to_timestamp(dt).ok()?;
                    let jump = tz.following(probe).next()?.timestamp();
                    if jump > after {
                        return Some(Timestamp::from_millis(jump.as_millisecond()));
                    }
                    from = local
                        .plus_second()
                        .max(Civil::from_jiff(later.to_datetime(jump)));
                }
                AmbiguousOffset::Fold { before, .. } => {
                    let first = before.to_timestamp(dt).ok()?;
                    if first > after {
                        return Some(Timestamp::from_millis(first.as_millisecond()));
                    }
                    // `after` is in the second pass: the rest of the repeated local times
                    // first occurred before it. Resume where the repetition ends.
                    let back = tz.following(first).next()?.timestamp();
                    from = local
                        .plus_second()
                        .max(Civil::from_jiff(before.to_datetime(back)));
                }
            }
        }
    }

    /// The first local time at or after `from` that matches, up to the end of `last_year`.
    fn next_match(&self, from: Civil, last_year: i32) -> Option<Civil> {
        let mut t = from;
        loop {
            if t.year > last_year {
                return None;
            }
            match next_bit(self.months, t.month) {
                Some(month) if month == t.month => {}
                Some(month) => t = Civil::month_start(t.year, month),
                None => {
                    t = Civil::month_start(t.year + 1, 1);
                    continue;
                }
            }
            let length = days_in_month(t.year, t.month);
            let mut day = t.day;
            while day <= length && !self.day_matches(t.year, t.month, day) {
                day += 1;
            }
            if day > length {
                t = t.next_month();
                continue;
            }
            if day != t.day {
                t = Civil {
                    day,
                    ..t.day_start()
                };
            }
            match next_bit(self.hours, t.hour) {
                Some(hour) if hour == t.hour => {}
                Some(hour) => {
                    t = Civil {
                        hour,
                        minute: 0,
                        second: 0,
                        ..t
                    }
                }
                None => {
                    t = t.next_day();
                    continue;
                }
            }
            match next_bit(self.minutes, t.minute) {
                Some(minute) if minute == t.minute => {}
                Some(minute) => {
                    t = Civil {
                        minute,
                        second: 0,
                        ..t
                    }
                }
                None => {
                    t = t.next_hour();
                    continue;
                }
            }
            match next_bit(self.seconds, t.second) {
                Some(second) => return Some(Civil { second, ..t }),
                None => t = t.next_minute(),
            }
        }
    }

    fn day_matches(&self, year: i32, month: u8, day: u8) -> bool {
        let by_date = self.days_of_month & (1 << day) != 0;
        let by_weekday = self.days_of_week & (1 << weekday(year, month, day)) != 0;
        if self.days_either {
            by_date || by_weekday
        } else {
            by_date && by_weekday
        }
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Cron::parse(text)
    }
}

fn expand_macro(text: &str) -> Result<&'static str, CronError> {
    const MACROS: [(&str, &str); 7] = [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ];
    MACROS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, expansion)| *expansion)
        .ok_or_else(|| CronError::UnknownMacro {
            name: text.to_owned(),
        })
}

/// Parses one field into a bitset, and whether it starts with `*` or `?` (Vixie's "star"
/// flag for the day-matching rule).
fn parse_field(text: &str, field: Field) -> Result<(u64, bool), CronError> {
    let is_day = matches!(field, Field::DayOfMonth | Field::DayOfWeek);
    if text.contains('?') {
        if text == "?" && is_day {
            return Ok((bits(field.min(), field.open_max(), 1), true));
        }
        return Err(CronError::MisplacedQuestionMark {
            field,
            value: text.to_owned(),
        });
    }
    let mut set = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(CronError::EmptyListItem {
                field,
                value: text.to_owned(),
            });
        }
        set |= parse_item(item, field)?;
    }
    Ok((set, text.starts_with('*')))
}

/// Parses one list item: `*`, `n`, `a-b`, each with an optional `/step`.
fn parse_item(item: &str, field: Field) -> Result<u64, CronError> {
    if item.contains('#') {
        return Err(CronError::Unsupported {
            field,
            value: item.to_owned(),
            feature: '#',
        });
    }
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(parse_step(step, item, field)?)),
        None => (item, None),
    };
    let (low, high) = if range == "*" {
        (field.min(), field.open_max())
    } else if let Some((low, high)) = range.split_once('-') {
        let (low, high) = (
            parse_value(low, item, field)?,
            parse_value(high, item, field)?,
        );
        if low > high {
            return Err(CronError::ReversedRange {
                field,
                value: item.to_owned(),
            });
        }
        (low, high)
    } else {
        let value = parse_value(range, item, field)?;
        match step {
            Some(_) => (value, field.open_max().max(value)),
            None => (value, value),
        }
    };
    Ok(bits(low, high, step.unwrap_or(1)))
}

fn parse_step(text: &str, item: &str, field: Field) -> Result<u32, CronError> {
    let step = parse_number(text).ok_or_else(|| CronError::NotANumber {
        field,
        value: if text.is_empty() { item } else { text }.to_owned(),
    })?;
    if step == 0 {
        return Err(CronError::StepZero {
            field,
            value: item.to_owned(),
        });
    }
    if step > u64::from(field.span()) {
        return Err(CronError::StepTooLarge {
            field,
            value: item.to_owned(),
            max: field.span(),
        });
    }
    u32::try_from(step).map_err(|_| CronError::StepTooLarge {
        field,
        value: item.to_owned(),
        max: field.span(),
    })
}

/// A number or a name in `field`'s range.
fn parse_value(text: &str, item: &str, field: Field) -> Result<u32, CronError> {
    if let Some(number) = parse_number(text) {
        return u32::try_from(number)
            .ok()
            .filter(|n| (field.min()..=field.max()).contains(n))
            .ok_or_else(|| CronError::OutOfRange {
                field,
                value: text.to_owned(),
                min: field.min(),
                max: field.max(),
            });
    }
    if let Some(index) = field
        .names()
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
    {
        // Months are 1-based, days of the week 0-based (SUN = 0).
        let index = u32::try_from(index).unwrap_or(0);
        return Ok(index + field.min());
    }
    let upper = text.to_ascii_uppercase();
    let digits_then = |suffix: &str| {
        upper
            .strip_suffix(suffix)
            .is_some_and(|prefix| prefix.bytes().all(|b| b.is_ascii_digit()))
    };
    let feature = if upper == "LW" || digits_then("L") {
        Some('L')
    } else if digits_then("W") {
        Some('W')
    } else {
        None
    };
    Err(match feature {
        Some(feature) => CronError::Unsupported {
            field,
            value: item.to_owned(),
            feature,
        },
        None => CronError::NotANumber {
            field,
            value: if text.is_empty() { item } else { text }.to_owned(),
        },
    })
}

/// ASCII digits only (no sign); saturates so that huge numbers are reported as out of range.
fn parse_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

fn bits(low: u32, high: u32, step: u32) -> u64 {
    (low..=high)
        .step_by(step.max(1) as usize)
        .fold(0, |set, value| set | (1 << value))
}

/// The smallest set bit of `set` at or above `from` (`from` < 64).
fn next_bit(set: u64, from: u8) -> Option<u8> {
    let above = set & (u64::MAX << from);
    (above != 0).then(|| above.trailing_zeros() as u8)
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Day of the week, 0 = Sunday (Howard Hinnant's days-from-civil).
fn weekday(year: i32, month: u8, day: u8) -> u8 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    // 1970-01-01 was a Thursday (4).
    (days + 4).rem_euclid(7) as u8
}

/// A local date-time to the second, cheap to step through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Civil {
    year: i32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl Civil {
    fn from_jiff(dt: jiff::civil::DateTime) -> Civil {
        // jiff's fields are within their ranges, so the casts are lossless.
        Civil {
            year: i32::from(dt.year()),
            month: dt.month() as u8,
            day: dt.day() as u8,
            hour: dt.hour() as u8,
            minute: dt.minute() as u8,
            second: dt.second() as u8,
        }
    }

    fn to_jiff(self) -> Option<jiff::civil::DateTime> {
        jiff::civil::DateTime::new(
            i16::try_from(self.year).ok()?,
            self.month as i8,
            self.day as i8,
            self.hour as i8,
            self.minute as i8,
            self.second as i8,
            0,
        )
        .ok()
    }

    fn month_start(year: i32, month: u8) -> Civil {
        Civil {
            year,
            month,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
        }
    }

    fn day_start(self) -> Civil {
        Civil {
            hour: 0,
            minute: 0,
            second: 0,
            ..self
        }
    }

    fn next_month(self) -> Civil {
        if self.month >= 12 {
            Civil::month_start(self.year + 1, 1)
        } else {
            Civil::month_start(self.year, self.month + 1)
        }
    }

    fn next_day(self) -> Civil {
        if self.day >= days_in_month(self.year, self.month) {
            self.next_month()
        } else {
            Civil {
                day: self.day + 1,
                ..self.day_start()
            }
        }
    }

    fn next_hour(self) -> Civil {
        if self.hour >= 23 {
            self.next_day()
        } else {
            Civil {
                hour: self.hour + 1,
                minute: 0,
                second: 0,
                ..self
            }
        }
    }

    fn next_minute(self) -> Civil {
        if self.minute >= 59 {
            self.next_hour()
        } else {
            Civil {
                minute: self.minute + 1,
                second: 0,
                ..self
            }
        }
    }

    fn plus_second(self) -> Civil {
        if self.second >= 59 {
            self.next_minute()
        } else {
            Civil {
                second: self.second + 1,
                ..self
            }
        }
    }
}

/// An IANA time zone, from the time zone database bundled into the binary (so it works
/// without `/usr/share/zoneinfo`).
#[derive(Debug, Clone)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl Zone {
    /// Coordinated Universal Time.
    pub fn utc() -> Zone {
        Zone {
            name: "UTC".to_owned(),
            tz: TimeZone::UTC,
        }
    }

    /// Looks up an IANA name such as `Europe/Berlin` or `UTC` (ignoring ASCII case); an
    /// unknown name is an error naming it.
    pub fn parse(name: &str) -> Result<Zone, CronError> {
        let unknown = || CronError::UnknownZone {
            name: name.to_owned(),
        };
        let tz = jiff::tz::db().get(name).map_err(|_| unknown())?;
        // `Etc/Unknown` resolves to jiff's "unknown" zone, which has no IANA name.
        let canonical = tz.iana_name().ok_or_else(unknown)?.to_owned();
        Ok(Zone {
            name: canonical,
            tz,
        })
    }

    /// The zone's IANA name, in the database's spelling (`America/New_York`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Zone {}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Parses the interval of an `every` schedule: numbers with units `d`, `h`, `m`, `s` and `ms`,
/// largest first, each at most once (`30s`, `5m`, `1h30m`, `1d`, `1500ms`). Intervals under
/// one second are rejected.
pub fn parse_every(text: &str) -> Result<Duration, CronError> {
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let bad = |reason| CronError::BadDuration {
        text: text.to_owned(),
        reason,
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut millis: u64 = 0;
    // Index into UNITS of the next unit allowed: units go largest first.
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let (number, tail) = rest.split_at(digits);
        let letters = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(letters);
        if unit.is_empty() {
            return Err(bad("a number has no unit"));
        }
        let position = UNITS
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(|| bad("unknown unit"))?;
        if position < next_unit {
            return Err(bad("units must go from largest to smallest, each once"));
        }
        next_unit = position + 1;
        let amount = parse_number(number)
            .and_then(|n| n.checked_mul(UNITS[position].1))
            .and_then(|n| millis.checked_add(n))
            .ok_or_else(|| bad("too large"))?;
        millis = amount;
        rest = tail;
    }
    if millis < 1_000 {
        return Err(CronError::EveryTooShort {
            text: text.to_owned(),
        });
    }
    Ok(Duration::from_millis(millis))
}

/// The first tick of an `every` schedule strictly after `after`: `anchor + k × interval` for
/// the smallest integer `k ≥ 0` that is later than `after` (so `anchor` itself when `after` is
/// before it). The interval is taken to the millisecond (at least one).
pub fn every_next_after(anchor: Timestamp, interval: Duration, after: Timestamp) -> Timestamp {
    let anchor_ms = i128::from(anchor.as_millis());
    let after_ms = i128::from(after.as_millis());
    if after_ms < anchor_ms {
        return anchor;
    }
    let step = i128::try_from(interval.as_millis())
        .unwrap_or(i128::MAX)
        .max(1);
    let ticks = (after_ms - anchor_ms) / step + 1;
    let next = anchor_ms.saturating_add(ticks.saturating_mul(step));
    Timestamp::from_millis(i64::try_from(next).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).expect("an RFC 3339 instant")
    }

    fn cron(expr: &str) -> Cron {
        Cron::parse(expr).expect("a valid expression")
    }

    fn zone(name: &str) -> Zone {
        Zone::parse(name).expect("a known zone")
    }

    fn next(expr: &str, after: &str, zone_name: &str) -> Option<Timestamp> {
        cron(expr).next_after(at(after), &zone(zone_name))
    }

    /// The successive fire times from `start`, `count` of them.
    fn run(expr: &str, start: &str, zone_name: &str, count: usize) -> Vec<Timestamp> {
        let (cron, zone) = (cron(expr), zone(zone_name));
        let mut ticks = Vec::new();
        let mut after = at(start);
        for _ in 0..count {
            after = cron.next_after(after, &zone).expect("a fire time");
            ticks.push(after);
        }
        ticks
    }

    fn seconds_of(set: u64) -> Vec<u32> {
        (0..64).filter(|bit| set & (1 << bit) != 0).collect()
    }

    fn err(expr: &str) -> String {
        Cron::parse(expr)
            .expect_err("an invalid expression")
            .to_string()
    }

    // ---- parsing ----

    #[test]
    fn a_five_field_expression_fires_on_second_zero() {
        let c = cron("5 4 * * *");
        assert_eq!(seconds_of(c.seconds), vec![0]);
        assert_eq!(seconds_of(c.minutes), vec![5]);
        assert_eq!(seconds_of(c.hours), vec![4]);
        assert_eq!(c.as_str(), "5 4 * * *");
    }

    #[test]
    fn a_six_field_expression_has_a_leading_seconds_field() {
        let c = cron("*/20 5 4 * * *");
        assert_eq!(seconds_of(c.seconds), vec![0, 20, 40]);
        assert_eq!(seconds_of(c.minutes), vec![5]);
    }

    #[test]
    fn fields_may_be_separated_by_any_whitespace() {
        assert_eq!(cron(" 1\t2 \n 3  4 5 ").as_str(), "1\t2 \n 3  4 5");
        assert_eq!(cron("1\t2 3 4 5").minutes, cron("1 2 3 4 5").minutes);
    }

    #[test]
    fn ranges_steps_and_lists_combine() {
        let c = cron("1,5-7,10-20/5,50/4 */6 1/10 * *");
        assert_eq!(
            seconds_of(c.minutes),
            vec![1, 5, 6, 7, 10, 15, 20, 50, 54, 58]
        );
        assert_eq!(seconds_of(c.hours), vec![0, 6, 12, 18]);
        assert_eq!(seconds_of(c.days_of_month), vec![1, 11, 21, 31]);
    }

    #[test]
    fn month_and_day_names_are_case_insensitive_and_work_in_ranges() {
        let c = cron("0 0 * jan-Mar,DEC mon-wed,Fri");
        assert_eq!(seconds_of(c.months), vec![1, 2, 3, 12]);
        assert_eq!(seconds_of(c.days_of_week), vec![1, 2, 3, 5]);
    }

    #[test]
    fn seven_and_zero_both_mean_sunday() {
        assert_eq!(seconds_of(cron("0 0 * * 7").days_of_week), vec![0]);
        assert_eq!(seconds_of(cron("0 0 * * 0").days_of_week), vec![0]);
        assert_eq!(seconds_of(cron("0 0 * * 5-7").days_of_week), vec![0, 5, 6]);
        assert_eq!(seconds_of(cron("0 0 * * SUN").days_of_week), vec![0]);
        assert_eq!(
            seconds_of(cron("0 0 * * *").days_of_week),
            vec![0, 1, 2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn macros_expand_to_their_expressions() {
        assert_eq!(cron("@yearly").months, cron("0 0 1 1 *").months);
        assert_eq!(
            cron("@annually").days_of_month,
            cron("0 0 1 1 *").days_of_month
        );
        assert_eq!(cron("@monthly").days_of_month, 1 << 1);
        assert_eq!(cron("@weekly").days_of_week, 1);
        assert_eq!(cron("@daily").hours, 1);
        assert_eq!(cron("@MIDNIGHT").minutes, 1);
        assert_eq!(cron("@hourly").hours, (1 << 24) - 1);
        assert_eq!(cron("@daily").as_str(), "@daily");
    }

    #[test]
    fn a_question_mark_is_a_star_in_the_day_fields() {
        assert_eq!(
            cron("0 0 ? * MON").days_of_month,
            cron("0 0 * * MON").days_of_month
        );
        assert_eq!(
            cron("0 0 1 * ?").days_of_week,
            cron("0 0 1 * *").days_of_week
        );
    }

    #[test]
    fn a_day_matches_either_day_field_when_both_are_restricted() {
        // The 13th or any Friday, in UTC; 2026-02-13 is a Friday, 2026-02-06 too.
        let ticks = run("0 0 13 * FRI", "2026-02-01T00:00:00Z", "UTC", 4);
        assert_eq!(
            ticks,
            vec![
                at("2026-02-06T00:00:00Z"),
                at("2026-02-13T00:00:00Z"),
                at("2026-02-20T00:00:00Z"),
                at("2026-02-27T00:00:00Z"),
            ]
        );
        let ticks = run("0 0 13 * MON", "2026-02-01T00:00:00Z", "UTC", 3);
        assert_eq!(
            ticks,
            vec![
                at("2026-02-02T00:00:00Z"),
                at("2026-02-09T00:00:00Z"),
                at("2026-02-13T00:00:00Z"),
            ]
        );
    }

    #[test]
    fn a_day_must_match_both_fields_when_one_starts_with_a_star() {
        // Mondays only.
        assert_eq!(
            next("0 0 * * MON", "2026-02-03T00:00:00Z", "UTC"),
            Some(at("2026-02-09T00:00:00Z"))
        );
        // Vixie's rule: `*/2` counts as a star, so odd days that are Mondays (2026-02-09).
        assert_eq!(
            next("0 0 */2 * MON", "2026-02-03T00:00:00Z", "UTC"),
            Some(at("2026-02-09T00:00:00Z"))
        );
        assert_eq!(
            next("0 0 ? * MON", "2026-02-03T00:00:00Z", "UTC"),
            Some(at("2026-02-09T00:00:00Z"))
        );
    }

    #[test]
    fn an_out_of_range_value_names_its_field_and_value() {
        assert_eq!(
            err("0 25 * * *"),
            "the hour field `25` is out of range 0–23"
        );
        assert_eq!(
            err("60 * * * *"),
            "the minute field `60` is out of range 0–59"
        );
        assert_eq!(
            err("61 * * * * *"),
            "the second field `61` is out of range 0–59"
        );
        assert_eq!(
            err("0 0 0 * *"),
            "the day-of-month field `0` is out of range 1–31"
        );
        assert_eq!(
            err("0 0 * 13 *"),
            "the month field `13` is out of range 1–12"
        );
        assert_eq!(
            err("0 0 * * 8"),
            "the day-of-week field `8` is out of range 0–7"
        );
        assert_eq!(
            err("0 0 * * 1-99999999999999999999999"),
            "the day-of-week field `99999999999999999999999` is out of range 0–7"
        );
    }

    #[test]
    fn a_wrong_number_of_fields_is_rejected() {
        assert_eq!(
            err("* * * *"),
            "a cron expression has 5 fields (minute hour day-of-month month day-of-week) or 6 \
             (a leading second field), not 4"
        );
        assert_eq!(
            Cron::parse("* * * * * * *"),
            Err(CronError::FieldCount { found: 7 })
        );
        assert_eq!(Cron::parse("  "), Err(CronError::Empty));
    }

    #[test]
    fn an_unknown_name_or_garbage_is_rejected() {
        assert_eq!(
            err("0 0 * FOO *"),
            "the month field `FOO` is not a number 1–12 or a month name JAN–DEC"
        );
        assert_eq!(
            err("0 0 * * MONDAY"),
            "the day-of-week field `MONDAY` is not a number 0–7 or a day name SUN–SAT"
        );
        assert_eq!(
            err("MON * * * *"),
            "the minute field `MON` is not a number 0–59"
        );
        assert_eq!(
            err("0 JAN * * *"),
            "the hour field `JAN` is not a number 0–23"
        );
        assert_eq!(
            err("+5 * * * *"),
            "the minute field `+5` is not a number 0–59"
        );
        assert_eq!(
            err("-5 * * * *"),
            "the minute field `-5` is not a number 0–59"
        );
        assert_eq!(
            err("*/x * * * *"),
            "the minute field `x` is not a number 0–59"
        );
        assert_eq!(
            err("1,,2 * * * *"),
            "the minute field `1,,2` has an empty list item"
        );
        assert!(err("@reboot").starts_with("unknown cron macro `@reboot`"));
    }

    #[test]
    fn a_step_of_zero_or_too_large_is_rejected() {
        assert_eq!(
            err("*/0 * * * *"),
            "the minute field `*/0` has a step of zero"
        );
        assert_eq!(
            err("0 1-5/0 * * *"),
            "the hour field `1-5/0` has a step of zero"
        );
        assert_eq!(
            err("0 */25 * * *"),
            "the hour field `*/25` has a step larger than 24, the field's number of values"
        );
    }

    #[test]
    fn a_backwards_range_is_rejected() {
        assert_eq!(
            err("0 0 * * FRI-MON"),
            "the day-of-week field `FRI-MON` is a range whose start is after its end"
        );
    }

    #[test]
    fn quartz_extensions_l_w_and_hash_are_rejected_by_name() {
        assert_eq!(
            err("0 0 L * *"),
            "the day-of-month field `L` uses `L`, which is not supported (L, W and # are not)"
        );
        assert_eq!(
            err("0 0 15W * *"),
            "the day-of-month field `15W` uses `W`, which is not supported (L, W and # are not)"
        );
        assert_eq!(
            err("0 0 LW * *"),
            "the day-of-month field `LW` uses `L`, which is not supported (L, W and # are not)"
        );
        assert_eq!(
            err("0 0 * * 5L"),
            "the day-of-week field `5L` uses `L`, which is not supported (L, W and # are not)"
        );
        assert_eq!(
            err("0 0 * * MON#2"),
            "the day-of-week field `MON#2` uses `#`, which is not supported (L, W and # are not)"
        );
    }

    #[test]
    fn a_question_mark_outside_the_day_fields_is_rejected() {
        assert_eq!(
            err("? * * * *"),
            "`?` stands alone in the day-of-month or day-of-week field; the minute field `?` \
             cannot use it"
        );
        assert!(matches!(
            Cron::parse("0 0 ?/2 * *"),
            Err(CronError::MisplacedQuestionMark { .. })
        ));
    }

    #[test]
    fn an_expression_longer_than_the_limit_is_rejected() {
        let long = format!("{} * * * *", "1,".repeat(200));
        assert_eq!(
            Cron::parse(&long),
            Err(CronError::TooLong {
                length: long.chars().count(),
                max: 256
            })
        );
    }

    // ---- next_after in UTC ----

    #[test]
    fn every_quarter_hour_fires_at_the_next_quarter_hour() {
        assert_eq!(
            next("*/15 * * * *", "2026-05-04T10:07:31.250Z", "UTC"),
            Some(at("2026-05-04T10:15:00Z"))
        );
        assert_eq!(
            next("*/15 * * * *", "2026-05-04T10:15:00Z", "UTC"),
            Some(at("2026-05-04T10:30:00Z"))
        );
        assert_eq!(
            next("*/15 * * * *", "2026-12-31T23:59:59.999Z", "UTC"),
            Some(at("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn a_weekday_schedule_skips_the_weekend() {
        // 2026-05-08 is a Friday.
        let ticks = run("0 9 * * MON-FRI", "2026-05-08T09:00:00Z", "UTC", 2);
        assert_eq!(
            ticks,
            vec![at("2026-05-11T09:00:00Z"), at("2026-05-12T09:00:00Z")]
        );
    }

    #[test]
    fn a_seconds_field_fires_within_the_minute() {
        let ticks = run("*/10 * * * * *", "2026-05-04T10:00:45.500Z", "UTC", 3);
        assert_eq!(
            ticks,
            vec![
                at("2026-05-04T10:00:50Z"),
                at("2026-05-04T10:01:00Z"),
                at("2026-05-04T10:01:10Z"),
            ]
        );
    }

    #[test]
    fn next_after_in_utc_agrees_with_a_minute_by_minute_scan() {
        let expressions = [
            "*/13 */5 * * *",
            "7 3,17 1-10/3 * *",
            "0 12 13 * FRI",
            "30 6 * FEB-APR,NOV SAT,SUN",
            "0 0 29,31 * *",
            "15 * ? * 2-4/2",
        ];
        let start = at("2027-12-20T00:00:00Z").as_millis();
        for expr in expressions {
            let c = cron(expr);
            let matches = |millis: i64| {
                let dt = jiff::Timestamp::from_millisecond(millis)
                    .expect("in range")
                    .to_zoned(TimeZone::UTC)
                    .datetime();
                let (minute, hour) = (dt.minute() as u32, dt.hour() as u32);
                let (day, month) = (dt.day() as u32, dt.month() as u32);
                let weekday = dt.weekday().to_sunday_zero_offset() as u32;
                let by_date = c.days_of_month & (1 << day) != 0;
                let by_weekday = c.days_of_week & (1 << weekday) != 0;
                let day_ok = if c.days_either {
                    by_date || by_weekday
                } else {
                    by_date && by_weekday
                };
                c.minutes & (1 << minute) != 0
                    && c.hours & (1 << hour) != 0
                    && c.months & (1 << month) != 0
                    && day_ok
            };
            let mut expected = start;
            let mut after = Timestamp::from_millis(start - 1);
            // Follow the schedule for 100 days of minutes.
            while expected < start + 100 * 86_400_000 {
                while !matches(expected) {
                    expected += 60_000;
                }
                let tick = c.next_after(after, &Zone::utc()).expect("a fire time");
                assert_eq!(tick, Timestamp::from_millis(expected), "{expr}");
                after = tick;
                expected += 60_000;
            }
        }
    }

    #[test]
    fn a_leap_day_schedule_waits_for_the_next_leap_year() {
        assert_eq!(
            next("0 0 29 2 *", "2026-03-01T00:00:00Z", "UTC"),
            Some(at("2028-02-29T00:00:00Z"))
        );
    }

    #[test]
    fn a_date_that_never_exists_gives_none_quickly() {
        let c = cron("0 0 30 2 *");
        let started = std::time::Instant::now();
        assert_eq!(c.next_after(at("2026-01-01T00:00:00Z"), &Zone::utc()), None);
        assert_eq!(
            c.next_after(at("2026-01-01T00:00:00Z"), &zone("America/New_York")),
            None
        );
        assert!(
            cron("0 0 31 4,6,9,11 *")
                .next_after(at("2026-01-01T00:00:00Z"), &Zone::utc())
                .is_none()
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
    }

    // ---- daylight saving ----

    #[test]
    fn a_local_time_the_clocks_skip_fires_once_at_the_jump() {
        // New York springs forward on 2026-03-08 at 02:00 EST (07:00Z) to 03:00 EDT.
        let ticks = run("30 2 * * *", "2026-03-07T12:00:00Z", "America/New_York", 3);
        assert_eq!(
            ticks,
            vec![
                at("2026-03-08T07:00:00Z"),
                at("2026-03-09T06:30:00Z"),
                at("2026-03-10T06:30:00Z"),
            ]
        );
        let before = at("2026-03-08T06:59:59Z");
        assert_eq!(
            cron("30 2 * * *").next_after(before, &zone("America/New_York")),
            Some(at("2026-03-08T07:00:00Z"))
        );
    }

    #[test]
    fn several_skipped_local_times_and_the_jump_itself_fire_once() {
        let ticks = run(
            "0,30 2,3 * * *",
            "2026-03-08T06:00:00Z",
            "America/New_York",
            3,
        );
        assert_eq!(
            ticks,
            vec![
                at("2026-03-08T07:00:00Z"),
                at("2026-03-08T07:30:00Z"),
                at("2026-03-09T06:00:00Z"),
            ]
        );
    }

    #[test]
    fn minutely_across_the_spring_gap_jumps_from_one_fifty_nine_to_three() {
        let ticks = run("* * * * *", "2026-03-08T06:58:30Z", "America/New_York", 3);
        assert_eq!(
            ticks,
            vec![
                at("2026-03-08T06:59:00Z"),
                at("2026-03-08T07:00:00Z"),
                at("2026-03-08T07:01:00Z"),
            ]
        );
    }

    #[test]
    fn a_local_time_the_clocks_repeat_fires_once_at_its_first_occurrence() {
        // New York falls back on 2026-11-01 at 02:00 EDT (06:00Z) to 01:00 EST.
        let ticks = run("30 1 * * *", "2026-10-31T12:00:00Z", "America/New_York", 2);
        assert_eq!(
            ticks,
            vec![at("2026-11-01T05:30:00Z"), at("2026-11-02T06:30:00Z")]
        );
    }

    #[test]
    fn hourly_across_the_fall_back_fires_the_repeated_hour_once() {
        let ticks = run("0 * * * *", "2026-11-01T03:30:00Z", "America/New_York", 4);
        assert_eq!(
            ticks,
            vec![
                at("2026-11-01T04:00:00Z"),
                at("2026-11-01T05:00:00Z"),
                at("2026-11-01T07:00:00Z"),
                at("2026-11-01T08:00:00Z"),
            ]
        );
    }

    #[test]
    fn an_instant_in_the_second_pass_resumes_after_the_repeated_hour() {
        let ny = zone("America/New_York");
        // 06:10Z is 01:10 EST, the second pass over 01:00–01:59.
        assert_eq!(
            cron("*/5 * * * *").next_after(at("2026-11-01T06:10:00Z"), &ny),
            Some(at("2026-11-01T07:00:00Z"))
        );
        assert_eq!(
            cron("* * * * * *").next_after(at("2026-11-01T06:59:59.999Z"), &ny),
            Some(at("2026-11-01T07:00:00Z"))
        );
        // The last minute of the first pass is followed by 02:00 EST.
        assert_eq!(
            cron("* * * * *").next_after(at("2026-11-01T05:59:00Z"), &ny),
            Some(at("2026-11-01T07:00:00Z"))
        );
    }

    #[test]
    fn berlin_fires_a_skipped_time_at_the_jump_and_a_repeated_time_once() {
        // 2026-03-29 01:00Z: 02:00 CET becomes 03:00 CEST.
        assert_eq!(
            run("30 2 * * *", "2026-03-28T12:00:00Z", "Europe/Berlin", 2),
            vec![at("2026-03-29T01:00:00Z"), at("2026-03-30T00:30:00Z")]
        );
        // 2026-10-25 01:00Z: 03:00 CEST becomes 02:00 CET; 02:30 first occurs at 00:30Z.
        assert_eq!(
            run("30 2 * * *", "2026-10-24T12:00:00Z", "Europe/Berlin", 2),
            vec![at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")]
        );
    }

    #[test]
    fn the_2026_transitions_are_where_the_tests_assume() {
        let transitions = |name: &str| -> Vec<Timestamp> {
            let tz = zone(name).tz;
            let start = jiff::Timestamp::from_millisecond(at("2026-01-01T00:00:00Z").as_millis())
                .expect("in range");
            tz.following(start)
                .take(2)
                .map(|t| Timestamp::from_millis(t.timestamp().as_millisecond()))
                .collect()
        };
        assert_eq!(
            transitions("America/New_York"),
            vec![at("2026-03-08T07:00:00Z"), at("2026-11-01T06:00:00Z")]
        );
        assert_eq!(
            transitions("Europe/Berlin"),
            vec![at("2026-03-29T01:00:00Z"), at("2026-10-25T01:00:00Z")]
        );
    }

    /// Walks `expr` from `start` for `count` fire times and checks the invariants: strictly
    /// increasing, each local time at most once, each tick after the instant asked about.
    fn check_invariants(expr: &str, start: &str, zone_name: &str, count: usize) {
        let (cron, zone) = (cron(expr), zone(zone_name));
        let mut after = at(start);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..count {
            let tick = cron.next_after(after, &zone).expect("a fire time");
            assert!(tick > after, "{expr} in {zone_name}: {tick} after {after}");
            assert_eq!(tick.as_millis() % 1000, 0);
            let local = zone.tz.to_datetime(
                jiff::Timestamp::from_millisecond(tick.as_millis()).expect("in range"),
            );
            assert!(
                seen.insert(local),
                "{expr} in {zone_name}: {local} fired twice"
            );
            after = tick;
        }
    }

    #[test]
    fn repeated_calls_are_strictly_increasing_and_fire_each_local_time_once() {
        for name in [
            "America/New_York",
            "Europe/Berlin",
            "Australia/Lord_Howe",
            "UTC",
        ] {
            check_invariants("0 * * * *", "2026-01-01T00:00:00Z", name, 24 * 366);
            check_invariants("*/7 * * * *", "2026-03-07T00:00:00Z", name, 3 * 24 * 60 / 7);
            check_invariants("*/7 * * * *", "2026-10-23T00:00:00Z", name, 3 * 24 * 60 / 7);
            check_invariants("*/7 * * * *", "2026-03-27T00:00:00Z", name, 3 * 24 * 60 / 7);
            check_invariants("*/7 * * * *", "2026-10-31T00:00:00Z", name, 3 * 24 * 60 / 7);
            check_invariants("*/7 * * * *", "2026-04-03T00:00:00Z", name, 3 * 24 * 60 / 7);
            check_invariants("*/7 * * * *", "2026-10-02T00:00:00Z", name, 3 * 24 * 60 / 7);
        }
    }

    #[test]
    fn any_starting_instant_around_a_transition_gives_a_later_tick_that_matches() {
        // From every minute around each 2026 transition, the next tick is after the start
        // and no earlier than the next tick of the minute before (monotonic in `after`).
        let every_minute = cron("* * * * *");
        let half_hourly = cron("0,30 * * * *");
        for name in ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe"] {
            let zone = zone(name);
            let start = jiff::Timestamp::from_millisecond(at("2026-01-01T00:00:00Z").as_millis())
                .expect("in range");
            for transition in zone.tz.following(start).take(2) {
                let centre = transition.timestamp().as_millisecond();
                for cron in [&every_minute, &half_hourly] {
                    let mut previous = None;
                    for minute in -180..=180i64 {
                        let after = Timestamp::from_millis(centre + minute * 60_000 + 17_000);
                        let tick = cron.next_after(after, &zone).expect("a fire time");
                        assert!(tick > after);
                        // At most half an hour, plus a repeated hour skipped.
                        assert!(tick.as_millis() - after.as_millis() <= 91 * 60_000);
                        if let Some(previous) = previous {
                            assert!(tick >= previous, "{name}: {tick} < {previous}");
                        }
                        previous = Some(tick);
                    }
                }
            }
        }
    }

    #[test]
    fn lord_howe_keeps_the_invariant_across_its_half_hour_shift() {
        // Lord Howe moves between +10:30 and +11:00. 2026-04-05 02:00 +11 → 01:30 +10:30
        // (2026-04-04T15:00Z); 2026-10-04 02:00 +10:30 → 02:30 +11 (2026-10-03T15:30Z).
        let lh = zone("Australia/Lord_Howe");
        assert_eq!(
            cron("45 1 * * *").next_after(at("2026-04-04T12:00:00Z"), &lh),
            Some(at("2026-04-04T14:45:00Z"))
        );
        assert_eq!(
            cron("15 2 * * *").next_after(at("2026-10-03T12:00:00Z"), &lh),
            Some(at("2026-10-03T15:30:00Z"))
        );
        check_invariants(
            "* * * * *",
            "2026-04-04T13:00:00Z",
            "Australia/Lord_Howe",
            240,
        );
        check_invariants(
            "* * * * *",
            "2026-10-03T14:00:00Z",
            "Australia/Lord_Howe",
            240,
        );
    }

    #[test]
    fn next_after_is_fast() {
        let ny = zone("America/New_York");
        let c = cron("0 0 30 2 *");
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(c.next_after(at("2026-01-01T00:00:00Z"), &ny).is_none());
        }
        // Generous for unoptimised builds: the horizon scan is a few thousand steps.
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }

    // ---- zones ----

    #[test]
    fn an_unknown_zone_is_an_error_naming_it() {
        let error = Zone::parse("Mars/Base").expect_err("no such zone");
        assert_eq!(error.to_string(), "unknown time zone `Mars/Base`");
        assert!(Zone::parse("").is_err());
        assert!(Zone::parse("Etc/Unknown").is_err());
    }

    #[test]
    fn utc_and_etc_utc_and_canonical_names_are_accepted() {
        assert_eq!(zone("UTC").name(), "UTC");
        assert_eq!(Zone::utc().name(), "UTC");
        assert_eq!(zone("Etc/UTC").name(), "Etc/UTC");
        assert_eq!(zone("europe/berlin").name(), "Europe/Berlin");
    }

    // ---- every ----

    #[test]
    fn every_accepts_seconds_minutes_hours_and_days() {
        assert_eq!(parse_every("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_every("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_every("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_every("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_every("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_every("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_every("1500ms"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn every_rejects_intervals_under_a_second() {
        assert_eq!(
            parse_every("500ms").expect_err("rejected").to_string(),
            "the `every` interval `500ms` is under one second"
        );
        assert_eq!(
            parse_every("0s"),
            Err(CronError::EveryTooShort {
                text: "0s".to_owned()
            })
        );
    }

    #[test]
    fn every_rejects_text_that_is_not_a_duration() {
        for text in ["", "5x", "-1s", "5", "s", "1m1h", "1s1s", "1 h", "1.5h"] {
            assert!(
                matches!(parse_every(text), Err(CronError::BadDuration { .. })),
                "{text:?}"
            );
        }
        assert!(
            parse_every("5x")
                .expect_err("rejected")
                .to_string()
                .starts_with("cannot read `5x` as a duration (unknown unit)")
        );
        assert!(matches!(
            parse_every("99999999999999999999d"),
            Err(CronError::BadDuration {
                reason: "too large",
                ..
            })
        ));
    }

    #[test]
    fn every_ticks_are_aligned_on_the_anchor() {
        let anchor = at("2026-05-04T10:00:00Z");
        let quarter = Duration::from_secs(15 * 60);
        assert_eq!(
            every_next_after(anchor, quarter, at("2026-05-04T10:14:59Z")),
            at("2026-05-04T10:15:00Z")
        );
        assert_eq!(
            every_next_after(anchor, quarter, at("2026-05-04T10:15:00Z")),
            at("2026-05-04T10:30:00Z")
        );
        assert_eq!(
            every_next_after(anchor, quarter, at("2026-05-04T09:00:00Z")),
            anchor
        );
        assert_eq!(
            every_next_after(anchor, quarter, anchor),
            at("2026-05-04T10:15:00Z")
        );
    }
}
