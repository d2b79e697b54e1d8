//! DPS timestamps: UTC ISO-8601 with up to seven fractional digits, trailing zeros trimmed
//! (`2023-05-09T20:31:23.6661066Z`).

use time::OffsetDateTime;

/// Formats `t` the way DPS does.
#[must_use]
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let ticks = t.nanosecond() / 100; // DPS (.NET) has 100 ns resolution
    let mut frac = format!("{ticks:07}");
    while frac.ends_with('0') {
        frac.pop();
    }
    let base = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if frac.is_empty() { format!("{base}Z") } else { format!("{base}.{frac}Z") }
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
    }
}
