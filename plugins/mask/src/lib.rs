//! `mask`: PII masking per column, in the sandbox.
//!
//! ```toml
//! [steps.stg_orders.transforms.config.columns]
//! email = { method = "hmac", secret = "mask_key" }  # hex HMAC-SHA256, hashed by the host
//! card  = { method = "keep_last", n = 4 }           # ************1234
//! ssn   = { method = "sha256" }                     # hex SHA-256 (unkeyed: guessable!)
//! notes = { method = "redact", with = "[removed]" }  # every value replaced
//! name  = { method = "null" }                       # every value set to null
//! ```
//!
//! The HMAC key is never in the pipeline file nor in the plugin: the file's `[secrets]`
//! table says where the host reads it from, the plugin's `secrets = [...]` grants its name,
//! and hashing happens in the host, at native speed.

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_sdk::arrow_array::new_null_array;
use weir_sdk::prelude::*;

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// Column name -> how to mask it.
    columns: BTreeMap<String, Method>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "weir_sdk::serde", tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum Method {
    /// Hex HMAC-SHA256 keyed with a granted secret.
    Hmac { secret: String },
    /// Hex SHA-256, unkeyed.
    Sha256,
    /// Replace every non-null value with `with` (default `REDACTED`).
    Redact { with: Option<String> },
    /// Keep the last `n` characters, replace the others with `*`.
    KeepLast { n: usize },
    /// Set every value to null.
    Null,
}

/// Masks rewrite their columns in place: the host sends only the masked columns.
pub struct Mask {
    /// Position in the batch the plugin receives (the masked columns, in input order).
    plan: Vec<(usize, Method)>,
    /// The whole output: the input with the masked fields changed.
    schema: SchemaRef,
    /// The masked columns as returned.
    part: SchemaRef,
    names: Vec<String>,
}

impl Transform for Mask {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        if config.columns.is_empty() {
            return Err(Error::config("columns: name at least one column to mask"));
        }
        let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut plan = Vec::new();
        for (name, method) in config.columns {
            let types: &[DataType] = match method {
                Method::Null => &[],
                _ => &[DataType::Utf8],
            };
            let index = require_column(input, &name, types)
                .map_err(|e| Error::config(format!("columns.{name}: {}", inner(e))))?;
            if let Method::KeepLast { n: 0 } = method {
                return Err(Error::config(format!("columns.{name}.n: must be at least 1")));
            }
            if matches!(method, Method::Null) {
                fields[index] = fields[index].clone().with_nullable(true);
            }
            plan.push((index, method));
        }
        plan.sort_by_key(|(index, _)| *index);
        let positions: Vec<usize> = plan.iter().map(|(index, _)| *index).collect();
        let schema = Arc::new(Schema::new(fields));
        let part = Arc::new(schema.project(&positions)?);
        let names = positions.iter().map(|&i| input.field(i).name().clone()).collect();
        let plan = plan.into_iter().enumerate().map(|(k, (_, method))| (k, method)).collect();
        Ok(Mask { plan, schema, part, names })
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn rewrites(&self) -> Option<Vec<String>> {
        Some(self.names.clone())
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut columns = batch.columns().to_vec();
        for (index, method) in &self.plan {
            let col = &columns[*index];
            let masked: ArrayRef = match method {
                Method::Null => new_null_array(col.data_type(), col.len()),
                Method::Hmac { secret } => {
                    Arc::new(host::hash_strings(&HashAlgorithm::HmacSha256(secret.clone()), col.as_string::<i32>())?)
                }
                Method::Sha256 => Arc::new(host::hash_strings(&HashAlgorithm::Sha256, col.as_string::<i32>())?),
                Method::Redact { with } => {
                    let with = with.as_deref().unwrap_or("REDACTED");
                    let s = col.as_string::<i32>();
                    Arc::new(s.iter().map(|v| v.map(|_| with)).collect::<StringArray>())
                }
                Method::KeepLast { n } => {
                    let s = col.as_string::<i32>();
                    Arc::new(s.iter().map(|v| v.map(|v| keep_last(v, *n))).collect::<StringArray>())
                }
            };
            columns[*index] = masked;
        }
        host::counter_add("rows_masked", batch.num_rows() as i64);
        Ok(RecordBatch::try_new(self.part.clone(), columns)?)
    }
}

fn inner(e: Error) -> String {
    match e {
        Error::InvalidConfig(m) | Error::Internal(m) => m,
        other => other.to_string(),
    }
}

fn keep_last(value: &str, n: usize) -> String {
    let count = value.chars().count();
    value.chars().enumerate().map(|(i, c)| if i + n < count { '*' } else { c }).collect()
}

weir_sdk::export_transform!(Mask);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing::{self, Harness};

    fn input() -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "email",
                Arc::new(StringArray::from(vec![Some("ana@example.com"), None, Some("bo@example.com")])) as ArrayRef,
            ),
            ("card", Arc::new(StringArray::from(vec!["4111111111111111", "12", "5500000000000004"])) as ArrayRef),
            ("name", Arc::new(StringArray::from(vec!["Ana", "Bo", "Cy"])) as ArrayRef),
            ("note", Arc::new(StringArray::from(vec!["x", "y", "z"])) as ArrayRef),
        ])
        .unwrap()
    }

    #[test]
    fn masks_every_method() {
        testing::grant_secret("k", b"key");
        let cfg = r#"
            [columns]
            email = { method = "hmac", secret = "k" }
            card = { method = "keep_last", n = 4 }
            name = { method = "null" }
            note = { method = "redact" }
        "#;
        let batch = input();
        let mut h = Harness::<Mask>::new(cfg, &batch.schema()).unwrap();
        let out = h.run(&[batch]).unwrap();
        let email = out.column(0).as_string::<i32>();
        assert_eq!(email.value(0).len(), 64);
        assert!(email.is_null(1), "nulls stay null");
        assert_ne!(email.value(0), email.value(2));
        let expected = weir_sdk::hashing::hash_strings(Some(b"key"), &[0, 15], b"ana@example.com").unwrap();
        assert_eq!(email.value(0).as_bytes(), &expected[..]);
        let card = out.column(1).as_string::<i32>();
        assert_eq!(card.value(0), "************1111");
        assert_eq!(card.value(1), "12");
        assert_eq!(out.column(2).null_count(), 3);
        assert_eq!(out.column(3).as_string::<i32>().value(2), "REDACTED");
        assert_eq!(testing::counter("rows_masked"), 3);
    }

    #[test]
    fn sha256_is_plain_digest() {
        let batch = input();
        let mut h = Harness::<Mask>::new("columns.note = { method = \"sha256\" }", &batch.schema()).unwrap();
        let out = h.run(&[batch]).unwrap();
        assert_eq!(
            out.column(3).as_string::<i32>().value(0),
            "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
        );
    }

    #[test]
    fn rewrites_only_the_masked_columns_in_place() {
        let batch = input();
        // `note` before `card` in the config: the rewrite follows the input's order
        let cfg = "columns.note = { method = \"redact\" }\ncolumns.card = { method = \"null\" }";
        let mut h = Harness::<Mask>::new(cfg, &batch.schema()).unwrap();
        assert!(h.output_schema().metadata().is_empty(), "the declaration is the host's, not the output's");
        let out = h.run(std::slice::from_ref(&batch)).unwrap();
        assert_eq!(out.schema().fields().len(), 4);
        assert_eq!(out.column(0), batch.column(0), "untouched columns pass through as they were");
        assert_eq!(out.column(2), batch.column(2));
        assert_eq!(out.column(1).null_count(), 3);
        assert_eq!(out.column(3).as_string::<i32>().value(0), "REDACTED");
        let mask = Mask::new(
            weir_sdk::runner::parse_config(
                r#"{"columns": {"note": {"method": "redact"}, "card": {"method": "null"}}}"#,
            )
            .unwrap(),
            &batch.schema(),
            &Context::default(),
        )
        .unwrap();
        assert_eq!(mask.rewrites(), Some(vec!["card".to_string(), "note".to_string()]));
    }

    #[test]
    fn config_errors_name_the_field() {
        let schema = input().schema();
        let err = Harness::<Mask>::new("columns.email = { method = \"rot13\" }", &schema).err().unwrap();
        assert!(err.to_string().contains("columns.email"), "{err}");
        let err = Harness::<Mask>::new("columns.emial = { method = \"null\" }", &schema).err().unwrap();
        assert!(err.to_string().contains("emial") && err.to_string().contains("email"), "{err}");
        let err = Harness::<Mask>::new("colums = {}", &schema).err().unwrap();
        assert!(err.to_string().contains("colums"), "{err}");
        let err = Harness::<Mask>::new("columns.email = { method = \"hmac\", secret = \"k\", salt = 1 }", &schema)
            .err()
            .unwrap();
        assert!(err.to_string().contains("salt"), "{err}");
    }

    #[test]
    fn ungranted_secret_fails() {
        let batch = input();
        let mut h =
            Harness::<Mask>::new("columns.email = { method = \"hmac\", secret = \"nope\" }", &batch.schema()).unwrap();
        let err = h.process(&batch).unwrap_err();
        assert!(err.to_string().contains("not granted"), "{err}");
    }
}
