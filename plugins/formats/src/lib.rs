//! `formats`: a quality rule that checks a string column holds values of a known format.
//!
//! ```toml
//! [[steps.stg_orders.checks]]
//! check = "plugin"
//! plugin = "formats"
//! config = { column = "country", format = "iso_country" }
//! severity = "warn"
//! ```
//!
//! Formats: `email` (local@domain.tld), `e164_phone` (+ and 8 to 15 digits), `iso_country`
//! (two upper-case letters), `sha256_hex` (64 lower-case hex digits). Nulls pass unless
//! `allow_null = false`.

use weir_sdk::prelude::*;
use weir_sdk::rule::{BatchVerdict, QualityRule, Verdict};

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    column: String,
    format: Format,
    #[serde(default = "yes")]
    allow_null: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(crate = "weir_sdk::serde", rename_all = "snake_case")]
pub enum Format {
    Email,
    E164Phone,
    IsoCountry,
    Sha256Hex,
}

impl Format {
    fn valid(self, v: &str) -> bool {
        match self {
            Format::Email => {
                let Some((local, domain)) = v.split_once('@') else { return false };
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.split('.').count() >= 2
                    && domain
                        .split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                    && !v.chars().any(char::is_whitespace)
            }
            Format::E164Phone => {
                let Some(digits) = v.strip_prefix('+') else { return false };
                (8..=15).contains(&digits.len())
                    && digits.chars().all(|c| c.is_ascii_digit())
                    && !digits.starts_with('0')
            }
            Format::IsoCountry => v.len() == 2 && v.chars().all(|c| c.is_ascii_uppercase()),
            Format::Sha256Hex => v.len() == 64 && v.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
        }
    }
}

pub struct Formats {
    index: usize,
    format: Format,
    allow_null: bool,
    rows: u64,
    failed: u64,
}

impl QualityRule for Formats {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        let index = require_column(input, &config.column, &[DataType::Utf8])?;
        Ok(Formats { index, format: config.format, allow_null: config.allow_null, rows: 0, failed: 0 })
    }

    fn check(&mut self, batch: &RecordBatch) -> Result<BatchVerdict> {
        let col = batch.column(self.index).as_string::<i32>();
        let mut v = BatchVerdict::default();
        for (row, value) in col.iter().enumerate() {
            match value {
                None if !self.allow_null => v.fail(row, "null"),
                None => {}
                Some(s) if !self.format.valid(s) => v.fail(row, format!("{s:?} is not a valid {:?}", self.format)),
                Some(_) => {}
            }
        }
        self.rows += batch.num_rows() as u64;
        self.failed += v.failed_rows.len() as u64;
        Ok(v)
    }

    fn finish(&mut self) -> Result<Verdict> {
        let mut v = Verdict::from_failures(self.failed);
        v.observed = Some(format!("{} of {} values malformed", self.failed, self.rows));
        Ok(v)
    }
}

weir_sdk::export_quality_rule!(Formats);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn formats_pass_and_fail() {
        let b = RecordBatch::try_from_iter([(
            "v",
            Arc::new(StringArray::from(vec![Some("ana@example.com"), Some("not an email"), None, Some("a@b")]))
                as ArrayRef,
        )])
        .unwrap();
        let (verdicts, end) =
            weir_sdk::rule::run_natively::<Formats>("column = \"v\"\nformat = \"email\"", std::slice::from_ref(&b))
                .unwrap();
        assert_eq!(verdicts[0].failed_rows, [1, 3]);
        assert!(verdicts[0].reasons[0].contains("not an email"));
        assert_eq!(end.observed.as_deref(), Some("2 of 4 values malformed"));
        let (verdicts, _) = weir_sdk::rule::run_natively::<Formats>(
            "column = \"v\"\nformat = \"email\"\nallow_null = false",
            std::slice::from_ref(&b),
        )
        .unwrap();
        assert_eq!(verdicts[0].failed_rows, [1, 2, 3]);
        assert!(Format::E164Phone.valid("+4915112345678") && !Format::E164Phone.valid("015112345678"));
        assert!(Format::IsoCountry.valid("DE") && !Format::IsoCountry.valid("de"));
        let e = weir_sdk::rule::run_natively::<Formats>("column = \"v\"\nformat = \"zip\"", &[b]).err().unwrap();
        assert!(e.to_string().contains("format"), "{e}");
    }
}
