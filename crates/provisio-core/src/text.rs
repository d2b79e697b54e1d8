//! Text helpers for messages that quote client input.

/// Longest piece of client input quoted in a message, in characters.
pub const QUOTED_CHARS: usize = 80;

/// `s` as it may be quoted in an error message or a log line: at most [`QUOTED_CHARS`]
/// characters, control characters removed (a quoted value must not break a log line or
/// forge one), and `…` when it was cut.
#[must_use]
pub fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(QUOTED_CHARS).filter(|c| !c.is_control()).collect();
    if s.chars().nth(QUOTED_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_long_text_is_cut_and_controls_dropped() {
        assert_eq!(shorten("dev-1"), "dev-1");
        assert_eq!(shorten(""), "");
        let exact = "a".repeat(QUOTED_CHARS);
        assert_eq!(shorten(&exact), exact, "exactly the limit is not cut");
        let long = "é".repeat(QUOTED_CHARS + 1);
        assert_eq!(shorten(&long), format!("{}…", "é".repeat(QUOTED_CHARS)), "counted in characters, not bytes");
        assert_eq!(shorten("a\nb\r\u{1b}[31mc"), "ab[31mc");
    }
}
