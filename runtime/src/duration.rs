//! Durations on the command line.

use std::time::Duration;

/// Parses `500ms`, `5s`, `2m`, `1h30m` (jiff's friendly format) or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let invalid = || format!("{s:?} is not a duration such as 500ms, 5s or 2m");
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| invalid());
    }
    let d: jiff::SignedDuration = s.parse().map_err(|_| invalid())?;
    Duration::try_from(d).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["fast", "5y", "-5s", "-1", "NaN", "inf", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
