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
/// instant, without a look-up in the time zone database) and labelled `UTC` again.
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
///
/// The digits are checked and combined a word at a time (eight bytes per operation, no
/// branch per character): in a plugin this runs once per value of a column, so it is
/// inlined into the column loop.
#[inline(always)]
pub fn fixed_width_timestamp_micros(text: &[u8]) -> Option<i64> {
    let time = match text.len() {
        10 => None,
        19 => Some(load(&text[11..19])),
        20 if matches!(text[19], b'Z' | b'z') => Some(load(&text[11..19])),
        _ => return None,
    };
    // bytes 0..8 `YYYY-MM-`, then `DD`
    let head = load(&text[..8]);
    let day_text = u64::from(u16::from_le_bytes([text[8], text[9]]));
    let mut ok = digits(head, 0x00FF_FF00_FFFF_FFFF)
        && head & 0xFF00_00FF_0000_0000 == 0x2D00_002D_0000_0000
        && digits(day_text, 0xFFFF);
    let (head, day_text) = (head & LOW_HALVES, day_text & LOW_HALVES);
    // year: four digits pairwise, then the pairs
    let pairs = ((head & 0xFFFF_FFFF) * 10 + ((head & 0xFFFF_FFFF) >> 8)) & 0x00FF_00FF;
    let year = ((pairs * 100 + (pairs >> 16)) & 0xFFFF) as u32;
    let (month, day) = (two_digits(head, 5), two_digits(day_text, 0));
    let mut seconds = 0;
    if let Some(t) = time {
        // bytes 11..19 `HH:MM:SS`; byte 10 is the date/time separator
        ok &= matches!(text[10], b'T' | b't' | b' ')
            && digits(t, 0xFFFF_00FF_FF00_FFFF)
            && t & 0x0000_FF00_00FF_0000 == 0x0000_3A00_003A_0000;
        let t = t & LOW_HALVES;
        let (h, m, s) = (two_digits(t, 0), two_digits(t, 3), two_digits(t, 6));
        ok &= h <= 23 && m <= 59 && s <= 59;
        seconds = i64::from(h * 3600 + m * 60 + s);
    }
    if !ok || !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some((days_since_epoch(year, month, day) * 86_400 + seconds) * 1_000_000)
}

/// `'0'` in every byte.
const ZEROS: u64 = 0x3030_3030_3030_3030;

/// The low half of every byte: a digit's value (separators become noise that is never read).
const LOW_HALVES: u64 = 0x0F0F_0F0F_0F0F_0F0F;

/// Eight bytes as a little-endian word: byte `i` of the text in bits `8i..8i+8`.
fn load(eight: &[u8]) -> u64 {
    u64::from_le_bytes(eight.try_into().unwrap_or_default())
}

/// Whether every byte of `word` that `lanes` selects is an ASCII digit: its high half is 3
/// and adding 6 to its low half does not carry (a low half of 10 or more would).
fn digits(word: u64, lanes: u64) -> bool {
    let w = word & lanes;
    let high = 0xF0F0_F0F0_F0F0_F0F0 & lanes;
    let three = ZEROS & lanes;
    w & high == three && (w + (0x0606_0606_0606_0606 & lanes)) & high == three
}

/// The two-digit number in bytes `at` and `at + 1` of a word of digit values.
fn two_digits(values: u64, at: u32) -> u32 {
    let pair = (values >> (8 * at)) as u32;
    (pair & 0xFF) * 10 + ((pair >> 8) & 0xFF)
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
    let mut values = vec![0i64; text.len()];
    for (i, (v, w)) in values.iter_mut().zip(offsets.windows(2)).enumerate() {
        match data.get(w[0] as usize..w[1] as usize).and_then(fixed_width_timestamp_micros) {
            Some(micros) => *v = micros,
            // what lies under a null slot is not looked at (and stays 0)
            None if text.is_null(i) => {}
            None => return None,
        }
    }
    if let Some(nulls) = text.nulls() {
        // a null slot whose bytes happened to parse
        values.iter_mut().zip(nulls.iter()).filter(|(_, valid)| !valid).for_each(|(v, _)| *v = 0);
    }
    let out = PrimitiveArray::<TimestampMicrosecondType>::new(values.into(), text.nulls().cloned());
    Some(Arc::new(out.with_timezone_opt(tz)))
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (years 0..=9999).
/// 32-bit arithmetic: in Wasm a 64-bit division by a constant stays a division, a 32-bit
/// one becomes a multiply.
fn days_since_epoch(year: u32, month: u32, day: u32) -> i64 {
    // count years from March, so the leap day is the last day of a counted year; 400 years
    // (146,097 days) later, so that year 0's January stays positive
    let y = year + 400 - u32::from(month <= 2);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 }; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let days = 365 * y + y / 4 - y / 100 + y / 400 + day_of_year;
    i64::from(days) - 719_468 - 146_097
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
            "2024-01-0:", // the byte after '9'
            "/024-01-01", // the byte before '0'
            "2024-01-01T1:0000:00",
            "2024-01-01T10:00:0:",
            "2024-01-01T10:00:00\0",
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
    fn any_one_byte_changed_is_read_as_arrow_cast_reads_it_or_left_to_it() {
        let to = DataType::Timestamp(TimeUnit::Microsecond, None);
        for base in ["2024-02-29", "1999-12-31T23:59:59", "2000-01-01 00:00:00Z"] {
            for at in 0..base.len() {
                for byte in 0..=255u8 {
                    let mut text = base.as_bytes().to_vec();
                    text[at] = byte;
                    let fast = fixed_width_timestamp_micros(&text);
                    let Ok(s) = std::str::from_utf8(&text) else {
                        assert_eq!(fast, None, "{text:?}");
                        continue;
                    };
                    if let Some(micros) = fast {
                        let arrow = by_arrow(&[Some(s)], &to);
                        let arrow = arrow.as_any().downcast_ref::<PrimitiveArray<TimestampMicrosecondType>>().unwrap();
                        assert!(arrow.is_valid(0), "{s:?} is not a timestamp to arrow_cast");
                        assert_eq!(micros, arrow.value(0), "{s:?}");
                    }
                }
            }
        }
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
