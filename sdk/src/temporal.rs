//! Text to timestamps without a general date parser for the forms data mostly comes in.
//!
//! `arrow_cast` parses every value through chrono (many formats, time zones, fractions), which
//! is most of the cost of casting a text column of timestamps. [`text_to_timestamps`] first
//! tries the three fixed-width forms that exports and logs nearly always use:
//! `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SS` (`T`, `t` or a space between) and the same with a
//! trailing `Z`. If any value of the array is in another form (fractions, offsets, a leap
//! second, anything invalid) it returns `None` and the caller casts with `arrow_cast`, so the
//! result and the errors are exactly those of `arrow_cast` for every input.

use std::sync::Arc;

use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{make_array, Array, ArrayRef, PrimitiveArray, StringArray};
use arrow_cast::{cast_with_options, CastOptions};
use arrow_schema::{ArrowError, DataType, TimeUnit};

/// `arrow_cast::cast_with_options`, with text to timestamps through
/// [`text_to_timestamps`] first, and the `UTC` zone cast as the offset `+00:00` (the same
/// instant; arrow_cast is built without a time zone database here and refuses the name)
/// and labelled `UTC` again.
pub fn cast_column(array: &dyn Array, to: &DataType, options: &CastOptions) -> Result<ArrayRef, ArrowError> {
    if let Some(fast) = text_to_timestamps(array, to) {
        return Ok(fast);
    }
    match to {
        DataType::Timestamp(unit, Some(tz)) if tz.as_ref() == "UTC" => {
            let offset = DataType::Timestamp(*unit, Some("+00:00".into()));
            let out = cast_with_options(array, &offset, options)?;
            let data = out.to_data().into_builder().data_type(to.clone()).build()?;
            Ok(make_array(data))
        }
        _ => cast_with_options(array, to, options),
    }
}

/// Microseconds since 1970-01-01T00:00:00 (UTC) of `text` in one of the fixed-width forms,
/// or `None` for anything else (including dates that do not exist and second 60).
pub fn fixed_width_timestamp_micros(text: &[u8]) -> Option<i64> {
    let (date, time) = match text.len() {
        10 => (text, None),
        19 => (&text[..10], Some(&text[10..])),
        20 if matches!(text[19], b'Z' | b'z') => (&text[..10], Some(&text[10..19])),
        _ => return None,
    };
    if date[4] != b'-' || date[7] != b'-' {
        return None;
    }
    let year = two_digits(date, 0)? as i64 * 100 + two_digits(date, 2)? as i64;
    let (month, day) = (two_digits(date, 5)?, two_digits(date, 8)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let mut seconds = days_since_epoch(year, month, day) * 86_400;
    if let Some(t) = time {
        if !matches!(t[0], b'T' | b't' | b' ') || t[3] != b':' || t[6] != b':' {
            return None;
        }
        let (h, m, s) = (two_digits(t, 1)?, two_digits(t, 4)?, two_digits(t, 7)?);
        if h > 23 || m > 59 || s > 59 {
            return None;
        }
        seconds += (h * 3600 + m * 60 + s) as i64;
    }
    Some(seconds * 1_000_000)
}

/// `array` cast to timestamps in microseconds (zone `tz`: none, or `UTC`) when every
/// non-null value has a fixed-width form; `None` when one does not (cast with `arrow_cast`
/// then) or when the target is not one this handles.
pub fn text_to_timestamps(array: &dyn Array, to: &DataType) -> Option<ArrayRef> {
    let tz = match to {
        DataType::Timestamp(TimeUnit::Microsecond, tz) => tz.clone(),
        _ => return None,
    };
    if tz.as_deref().is_some_and(|z| z != "UTC") {
        return None;
    }
    let text = array.as_any().downcast_ref::<StringArray>()?;
    let (offsets, data) = (text.value_offsets(), text.value_data());
    let mut values = Vec::with_capacity(text.len());
    for (i, w) in offsets.windows(2).enumerate() {
        if text.is_null(i) {
            values.push(0);
            continue;
        }
        values.push(fixed_width_timestamp_micros(data.get(w[0] as usize..w[1] as usize)?)?);
    }
    let out = PrimitiveArray::<TimestampMicrosecondType>::new(values.into(), text.nulls().cloned());
    Some(Arc::new(out.with_timezone_opt(tz)))
}

fn two_digits(b: &[u8], at: usize) -> Option<u32> {
    let (hi, lo) = (b[at].wrapping_sub(b'0'), b[at + 1].wrapping_sub(b'0'));
    (hi < 10 && lo < 10).then_some(hi as u32 * 10 + lo as u32)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (years 0..=9999).
fn days_since_epoch(year: i64, month: u32, day: u32) -> i64 {
    // count years from March, so the leap day is the last day of a counted year
    let y = if month <= 2 { year - 1 } else { year };
    let shifted_month = (month as i64 + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day as i64 - 1;
    let leap_days = y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400);
    365 * y + leap_days + day_of_year - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// arrow_cast's result (`UTC` as `+00:00`, relabelled)
    fn by_arrow(values: &[Option<&str>], to: &DataType) -> ArrayRef {
        let a = StringArray::from(values.to_vec());
        let options = CastOptions { safe: true, ..Default::default() };
        match to {
            DataType::Timestamp(unit, Some(_)) => {
                let out = cast_with_options(&a, &DataType::Timestamp(*unit, Some("+00:00".into())), &options).unwrap();
                make_array(out.to_data().into_builder().data_type(to.clone()).build().unwrap())
            }
            _ => cast_with_options(&a, to, &options).unwrap(),
        }
    }

    #[test]
    fn every_fixed_width_value_is_what_arrow_cast_gives() {
        let mut values = Vec::new();
        for year in [0, 1, 4, 100, 400, 1600, 1899, 1900, 1969, 1970, 1971, 2000, 2023, 2024, 2100, 9999] {
            for (month, day) in [(1, 1), (2, 28), (2, 29), (3, 1), (4, 30), (6, 15), (12, 31)] {
                for time in ["", "T00:00:00", "T23:59:59", " 12:34:56", "t01:02:03", "T10:00:00Z", "T10:00:00z"] {
                    values.push(format!("{year:04}-{month:02}-{day:02}{time}"));
                }
            }
        }
        let text: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
        for to in [
            DataType::Timestamp(TimeUnit::Microsecond, None),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ] {
            let want = by_arrow(&text, &to);
            // one at a time: a date that does not exist (Feb 29 of a common year) is null in
            // arrow's result and not taken by the fast path
            for (i, v) in text.iter().enumerate() {
                let fast = fixed_width_timestamp_micros(v.unwrap().as_bytes());
                let arrow = want.is_valid(i).then(|| {
                    want.as_any().downcast_ref::<PrimitiveArray<TimestampMicrosecondType>>().unwrap().value(i)
                });
                assert_eq!(fast, arrow, "{v:?}");
            }
            let valid: Vec<Option<&str>> =
                text.iter().enumerate().filter(|(i, _)| want.is_valid(*i)).map(|(_, v)| *v).collect();
            let mut with_nulls = valid.clone();
            with_nulls.insert(3, None);
            with_nulls.push(None);
            let fast = text_to_timestamps(&StringArray::from(with_nulls.clone()), &to).expect("all fixed width");
            assert_eq!(fast.as_ref(), by_arrow(&with_nulls, &to).as_ref());
            assert_eq!(fast.data_type(), &to);
        }
    }

    #[test]
    fn other_forms_and_bad_values_are_left_to_arrow_cast() {
        let to = DataType::Timestamp(TimeUnit::Microsecond, None);
        for odd in [
            "2024-01-02T10:00:00.5",     // fraction
            "2024-01-02T10:00:00+02:00", // offset
            "2024-01-02T23:59:60",       // leap second
            "2024-13-01",
            "2024-00-10",
            "2023-02-29",
            "2024-04-31",
            "2024-01-00",
            "2024-01-02T24:00:00",
            "2024-01-02T10:60:00",
            "2024-01-02X10:00:00",
            "2024-01-02T10-00-00",
            "2024/01/02",
            "+024-01-02",
            "2024-01-0a",
            "2024-01-02T10:00:0",
            "2024-01-02T10:00:00ZZ",
            "",
            "2024-01-02 ",
        ] {
            assert_eq!(fixed_width_timestamp_micros(odd.as_bytes()), None, "{odd}");
            let a = StringArray::from(vec![Some("2024-01-02"), Some(odd)]);
            assert!(text_to_timestamps(&a, &to).is_none(), "{odd}");
        }
        let a = StringArray::from(vec!["2024-01-02"]);
        assert!(text_to_timestamps(&a, &DataType::Timestamp(TimeUnit::Microsecond, Some("+02:00".into()))).is_none());
        assert!(text_to_timestamps(&a, &DataType::Timestamp(TimeUnit::Nanosecond, None)).is_none());
        assert!(text_to_timestamps(&a, &DataType::Date32).is_none());
    }

    #[test]
    fn cast_column_takes_any_form_arrow_takes_and_the_utc_zone() {
        let options = CastOptions { safe: false, ..Default::default() };
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        // a fraction and an offset: not fixed width, so arrow_cast parses them
        let a = StringArray::from(vec!["2024-01-02T10:00:00.5", "2024-01-02T12:00:00+02:00", "2024-01-02"]);
        let out = cast_column(&a, &utc, &options).unwrap();
        assert_eq!(out.data_type(), &utc);
        let v = out.as_any().downcast_ref::<PrimitiveArray<TimestampMicrosecondType>>().unwrap();
        assert_eq!(v.values().to_vec(), vec![1_704_189_600_500_000, 1_704_189_600_000_000, 1_704_153_600_000_000]);
        // a bad value is arrow_cast's error (safe = false) or null (safe = true)
        let bad = StringArray::from(vec!["2024-01-02", "2024-02-30"]);
        let e = cast_column(&bad, &utc, &options).unwrap_err();
        assert!(e.to_string().contains("2024-02-30"), "{e}");
        let out = cast_column(&bad, &utc, &CastOptions { safe: true, ..Default::default() }).unwrap();
        assert!(out.is_valid(0) && out.is_null(1));
        // other casts are arrow_cast's
        let n = cast_column(&StringArray::from(vec!["7"]), &DataType::Int64, &options).unwrap();
        assert_eq!(n.data_type(), &DataType::Int64);
    }

    #[test]
    fn a_sliced_array_and_garbage_under_nulls() {
        let to = DataType::Timestamp(TimeUnit::Microsecond, None);
        // the value under a null slot is not parsed
        let a = StringArray::new(
            arrow_buffer::OffsetBuffer::new(vec![0, 3, 13].into()),
            b"bad2024-01-02".to_vec().into(),
            Some(vec![false, true].into()),
        );
        let fast = text_to_timestamps(&a, &to).unwrap();
        assert!(fast.is_null(0));
        assert_eq!(fast.as_ref(), by_arrow(&[None, Some("2024-01-02")], &to).as_ref());
        let long = StringArray::from(vec!["1999-12-31T23:59:59", "2000-01-01", "2000-02-29 00:00:01"]);
        let part = long.slice(1, 2);
        assert_eq!(
            text_to_timestamps(&part, &to).unwrap().as_ref(),
            by_arrow(&[Some("2000-01-01"), Some("2000-02-29 00:00:01")], &to).as_ref()
        );
    }
}
