//! Timestamps in, timestamps out: every RFC 3339 spelling a producer may use is read, and every
//! date-time leaves the product in one canonical form, `YYYY-MM-DDTHH:MM:SS.sssZ` (UTC,
//! milliseconds), which Salesforce's REST API accepts for dateTime fields.
//!
//! Accepted (RFC 3339 §5.6, <https://www.rfc-editor.org/rfc/rfc3339#section-5.6>): `T` or `t`
//! between date and time, or a space (the RFC's NOTE allows it "for the sake of readability");
//! `Z`/`z` or a `±HH:MM` offset (`-00:00` is UTC "with unknown local offset", still an instant);
//! a fraction of any length (cut to milliseconds, never rounded up, so an end never moves past a
//! later start); a leap second (`23:59:60`, read as the last instant before the next minute).
//! Rejected: no offset at all (a local time names no instant), a date without a time, offsets
//! without the colon (`+0100`) or out of range, any other separator, out-of-range fields.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Why a text is not an RFC 3339 date-time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.fraction] and Z or ±HH:MM): {value:?}, {why}"
)]
pub struct NotRfc3339 {
    /// The text as it came (a timestamp is not personal data).
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

/// Reads an RFC 3339 date-time in any of the spellings the module doc lists.
///
/// Errors: [`NotRfc3339`] saying what is missing or wrong (no offset, bad separator, …).
pub fn parse(value: &str) -> Result<OffsetDateTime, NotRfc3339> {
    let fail = |why: String| NotRfc3339 {
        value: value.to_owned(),
        why,
    };
    // `time` accepts any byte between date and time; RFC 3339 allows only `T` (either case)
    // and, by its NOTE, a space.
    match value.as_bytes().get(10) {
        None => {
            return Err(fail(
                "a date-time needs a date, a time and an offset".into(),
            ));
        }
        Some(b'T' | b't' | b' ') => {}
        Some(_) => {
            return Err(fail(
                "date and time must be separated by \"T\" or a space".into(),
            ));
        }
    }
    let at = OffsetDateTime::parse(value, &Rfc3339).map_err(|e| {
        let time_part = &value[value.len().min(11)..];
        if !time_part.contains(['Z', 'z', '+', '-']) {
            fail("it has no UTC offset (Z or ±HH:MM), so it names no instant".into())
        } else {
            fail(e.to_string())
        }
    })?;
    // `0000-01-01T00:30:00+01:00` and `9999-12-31T23:30:00-01:00` are RFC 3339, but their UTC
    // instant has no four-digit year, so no canonical form.
    match at.checked_to_offset(UtcOffset::UTC) {
        Some(utc) if (0..=9999).contains(&utc.year()) => Ok(at),
        _ => Err(fail(
            "in UTC it falls outside the years 0000 to 9999".into(),
        )),
    }
}

/// The instant at the canonical form's precision: the fraction cut (not rounded) to
/// milliseconds. Compare these, not the parsed instants, when the order must survive
/// canonicalisation (an end 0.4 ms after its start has the same canonical form).
pub fn to_millis(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_millisecond(at.millisecond())
        .expect("a millisecond of the same instant is in range")
}

/// The canonical form of an instant: `YYYY-MM-DDTHH:MM:SS.sssZ`, UTC, the fraction cut (not
/// rounded) to milliseconds. Written digit by digit: every booking has three of these (its
/// start, its end and the event's time), and `time`'s format descriptions interpret their items
/// on every call.
///
/// Panics on a UTC year outside 0000..=9999, which has no four-digit form; [`parse`] admits no
/// such instant.
pub fn canonical(at: OffsetDateTime) -> String {
    let at = at.to_offset(UtcOffset::UTC);
    let year = u32::try_from(at.year())
        .ok()
        .filter(|year| *year <= 9999)
        .expect("a year in 0000..=9999 formats; `parse` admits no other");
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, digits: usize, mut value: u32| {
        for place in (at..at + digits).rev() {
            // A digit: `value % 10` is below 10.
            text[place] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u32::from(u8::from(at.month())));
    put(8, 2, u32::from(at.day()));
    put(11, 2, u32::from(at.hour()));
    put(14, 2, u32::from(at.minute()));
    put(17, 2, u32::from(at.second()));
    put(20, 3, u32::from(at.millisecond()));
    text.iter().copied().map(char::from).collect()
}

/// [`parse`] then [`canonical`].
pub fn normalise(value: &str) -> Result<String, NotRfc3339> {
    parse(value).map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rfc3339_spelling_of_one_instant_has_one_canonical_form() {
        for spelling in [
            "2026-12-01T14:00:00Z",
            "2026-12-01 14:00:00Z",
            "2026-12-01t14:00:00z",
            "2026-12-01T15:00:00+01:00",
            "2026-12-01T09:30:00-04:30",
            "2026-12-01T14:00:00-00:00",
            "2026-12-01T14:00:00.0Z",
            "2026-12-01T14:00:00.000000000000Z",
            "2026-12-01 15:00:00.0004+01:00",
        ] {
            assert_eq!(
                normalise(spelling).as_deref(),
                Ok("2026-12-01T14:00:00.000Z"),
                "{spelling}"
            );
        }
    }

    #[test]
    fn fractions_are_cut_to_milliseconds_never_rounded_up() {
        assert_eq!(
            normalise("2026-12-01T14:00:00.1Z").unwrap(),
            "2026-12-01T14:00:00.100Z"
        );
        assert_eq!(
            normalise("2026-12-01T14:00:59.9999999Z").unwrap(),
            "2026-12-01T14:00:59.999Z"
        );
    }

    #[test]
    fn a_leap_second_is_the_last_instant_of_its_minute() {
        assert_eq!(
            normalise("2016-12-31T23:59:60Z").unwrap(),
            "2016-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn what_is_not_rfc3339_is_rejected_with_the_reason() {
        for (value, says) in [
            ("2026-12-01T14:00:00", "no UTC offset"),
            ("2026-12-01 14:00", "no UTC offset"),
            ("2026-12-01", "needs a date, a time"),
            ("2026-12-01_14:00:00Z", "separated by"),
            ("2026-12-01T14:00:00+0100", "not an RFC 3339"),
            ("2026-12-01T14:00:00+24:00", "not an RFC 3339"),
            ("2026-13-01T14:00:00Z", "not an RFC 3339"),
            ("2026-02-30T14:00:00Z", "not an RFC 3339"),
            ("20261201T140000Z", "separated by"),
            ("", "needs a date, a time"),
            ("0000-01-01T00:30:00+01:00", "outside the years"),
            ("9999-12-31T23:30:00-01:00", "outside the years"),
        ] {
            let error = parse(value).unwrap_err().to_string();
            assert!(error.contains(says), "{value:?}: {error}");
        }
    }

    /// Property: the canonical form is what `time` writes with the form's format description,
    /// for instants all over the years it admits.
    #[test]
    fn canonical_form_is_what_the_format_description_writes() {
        use rand::Rng;
        let described = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let mut rng = rand::thread_rng();
        let edges = [-62_167_219_200_i64, 0, 253_402_300_799];
        let random: Vec<i64> = (0..5_000)
            .map(|_| rng.gen_range(edges[0]..=edges[2]))
            .collect();
        for seconds in edges.into_iter().chain(random) {
            let nanos = rng.gen_range(0..1_000_000_000_u32);
            let at = OffsetDateTime::from_unix_timestamp(seconds)
                .unwrap()
                .replace_nanosecond(nanos)
                .unwrap();
            let expected = to_millis(at).format(&described).unwrap();
            assert_eq!(canonical(at), expected);
            let local = at.to_offset(UtcOffset::from_hms(-9, -30, 0).unwrap());
            assert_eq!(canonical(local), expected, "{local}");
        }
    }

    /// Property: for every instant and every accepted spelling of it, the canonical form is the
    /// same, and reading the canonical form back gives the instant (to the millisecond).
    #[test]
    fn canonical_form_is_a_fixed_point_for_random_instants_and_spellings() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        for _ in 0..2_000 {
            let seconds = rng.gen_range(-62_135_596_800..253_402_300_799_i64); // years 1..=9999
            let nanos = rng.gen_range(0..1_000_000_000_u32);
            let at = OffsetDateTime::from_unix_timestamp(seconds)
                .unwrap()
                .replace_nanosecond(nanos)
                .unwrap();
            let expected = canonical(at);
            assert_eq!(normalise(&expected).unwrap(), expected, "fixed point");
            let minutes = rng.gen_range(-(23 * 60 + 59)..=(23 * 60 + 59));
            let offset = UtcOffset::from_whole_seconds(minutes * 60).unwrap();
            let Ok(local) = at.to_offset(offset).format(&Rfc3339) else {
                continue; // the local year left 0000..=9999
            };
            let separator = [" ", "t", "T"][rng.gen_range(0..3)];
            let spelling = format!("{}{separator}{}", &local[..10], &local[11..]);
            let spelling = if rng.gen_bool(0.5) {
                spelling.to_lowercase()
            } else {
                spelling
            };
            assert_eq!(normalise(&spelling).unwrap(), expected, "{spelling}");
        }
    }
}
