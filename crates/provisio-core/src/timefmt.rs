//! DPS timestamps: UTC ISO-8601 with up to seven fractional digits, trailing zeros trimmed
//! (`2023-05-09T20:31:23.6661066Z`).

use time::OffsetDateTime;

/// Formats `t` the way DPS does.
#[must_use]
pub fn format(t: OffsetDateTime) -> String {
    use std::fmt::Write as _;
    let t = t.to_offset(time::UtcOffset::UTC);
    let (year, month, day) = t.to_calendar_date();
    let (hour, minute, second) = t.to_hms();
    // One buffer, written once: this runs twice per registration (record and audit line).
    let mut out = String::with_capacity(28);
    let _ = write!(out, "{year:04}-{:02}-{day:02}T{hour:02}:{minute:02}:{second:02}", u8::from(month));
    let mut ticks = t.nanosecond() / 100; // DPS (.NET) has 100 ns resolution
    if ticks > 0 {
        let mut digits = 7;
        while ticks.is_multiple_of(10) {
            ticks /= 10;
            digits -= 1;
        }
        let _ = write!(out, ".{ticks:0digits$}");
    }
    out.push('Z');
    out
}

/// Now, formatted.
#[must_use]
pub fn now() -> String {
    format(OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn trims_to_seven_digits() {
        assert_eq!(format(datetime!(2023-05-09 20:31:23.666106612 UTC)), "2023-05-09T20:31:23.6661066Z");
        assert_eq!(format(datetime!(2023-05-16 21:51:55.7050970 UTC)), "2023-05-16T21:51:55.705097Z");
        assert_eq!(format(datetime!(2023-05-16 21:51:55 UTC)), "2023-05-16T21:51:55Z");
        assert_eq!(format(datetime!(2023-05-16 21:51:55.0000001 UTC)), "2023-05-16T21:51:55.0000001Z");
        assert_eq!(format(datetime!(2023-05-16 21:51:55.00000009 UTC)), "2023-05-16T21:51:55Z", "below 100 ns");
        assert_eq!(format(datetime!(2023-05-16 21:51:55.1 UTC)), "2023-05-16T21:51:55.1Z");
        assert_eq!(format(datetime!(0999-01-02 03:04:05.02 UTC)), "0999-01-02T03:04:05.02Z");
        assert_eq!(
            format(datetime!(2023-05-16 23:51:55.5 +02:00)),
            "2023-05-16T21:51:55.5Z",
            "in UTC whatever the offset"
        );
    }
}
