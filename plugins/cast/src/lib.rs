//! `cast`: select, rename and cast columns.
//!
//! ```toml
//! [steps.stg_orders.transforms.config]
//! columns = [
//!   { column = "order_id", type = "int64" },
//!   { column = "ordered_at", type = "timestamp" },
//!   { column = "ordered_at", type = "date", rename = "order_date" },  # a column may be used twice
//!   { column = "email_hash", rename = "email" },                      # rename only
//! ]
//! ```
//!
//! Only the listed columns are kept, in the listed order. A value that cannot be cast is an
//! invalid-input error that names the row, the column and the value; nulls stay null.

use std::sync::Arc;

use weir_sdk::arrow_cast::{can_cast_types, display::ArrayFormatter, CastOptions};
use weir_sdk::prelude::*;
use weir_sdk::temporal::cast_column;
use weir_sdk::util::{parse_type_name, TYPE_NAMES};

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct Config {
    columns: Vec<ColumnSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
pub struct ColumnSpec {
    column: String,
    #[serde(rename = "type")]
    to: Option<String>,
    rename: Option<String>,
}

struct Plan {
    source: usize,
    to: DataType,
}

pub struct Cast {
    plan: Vec<Plan>,
    schema: SchemaRef,
    /// When the config keeps every input column in place (same order, same names) and only
    /// changes types, the cast is a column rewrite: the host sends only those columns.
    rewrite: Option<InPlace>,
}

struct InPlace {
    names: Vec<String>,
    /// Over the batch the plugin then receives: the changed columns, in input order.
    plan: Vec<Plan>,
    part: SchemaRef,
}

impl InPlace {
    fn of(input: &SchemaRef, plan: &[Plan], schema: &SchemaRef) -> Result<Option<InPlace>> {
        let in_place = plan.len() == input.fields().len()
            && plan.iter().enumerate().all(|(i, p)| p.source == i && schema.field(i).name() == input.field(i).name());
        if !in_place {
            return Ok(None);
        }
        let changed: Vec<usize> = (0..plan.len()).filter(|&i| &plan[i].to != input.field(i).data_type()).collect();
        if changed.is_empty() {
            return Ok(None);
        }
        Ok(Some(InPlace {
            names: changed.iter().map(|&i| input.field(i).name().clone()).collect(),
            plan: changed.iter().enumerate().map(|(k, &i)| Plan { source: k, to: plan[i].to.clone() }).collect(),
            part: Arc::new(schema.project(&changed)?),
        }))
    }
}

impl Transform for Cast {
    type Config = Config;

    fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
        if config.columns.is_empty() {
            return Err(Error::config("columns: list at least one column"));
        }
        let mut plan = Vec::new();
        let mut fields = Vec::new();
        for (i, spec) in config.columns.into_iter().enumerate() {
            let source = require_column(input, &spec.column, &[])
                .map_err(|e| Error::config(format!("columns[{i}]: {}", msg(e))))?;
            let from = input.field(source);
            let to = match &spec.to {
                None => from.data_type().clone(),
                Some(t) => parse_type_name(t).ok_or_else(|| {
                    Error::config(format!("columns[{i}].type: unknown type `{t}`; use one of {TYPE_NAMES}"))
                })?,
            };
            if !can_cast_types(from.data_type(), &to) {
                return Err(Error::config(format!(
                    "columns[{i}]: cannot cast `{}` from {} to {to}",
                    spec.column,
                    from.data_type()
                )));
            }
            let name = spec.rename.unwrap_or(spec.column);
            if fields.iter().any(|f: &Field| f.name() == &name) {
                return Err(Error::config(format!("columns[{i}]: output column `{name}` appears twice; rename one")));
            }
            fields.push(Field::new(&name, to.clone(), from.is_nullable()));
            plan.push(Plan { source, to });
        }
        let schema = Arc::new(Schema::new(fields));
        let rewrite = InPlace::of(input, &plan, &schema)?;
        Ok(Cast { plan, schema, rewrite })
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn rewrites(&self) -> Option<Vec<String>> {
        self.rewrite.as_ref().map(|r| r.names.clone())
    }

    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let options = CastOptions { safe: true, ..Default::default() };
        let (plan, schema) = match &self.rewrite {
            Some(r) => (&r.plan, &r.part),
            None => (&self.plan, &self.schema),
        };
        let mut columns = Vec::with_capacity(plan.len());
        for p in plan {
            let input = batch.column(p.source);
            let out = cast_column(input.as_ref(), &p.to, &options)?;
            if out.null_count() > input.null_count() {
                let row = (0..input.len()).find(|&r| out.is_null(r) && !input.is_null(r)).unwrap_or(0);
                let value = ArrayFormatter::try_new(input.as_ref(), &Default::default())
                    .map(|f| f.value(row).to_string())
                    .unwrap_or_default();
                let source = batch.schema().field(p.source).name().clone();
                return Err(Error::input(row, source, format!("cannot cast {value:?} to {}", p.to)));
            }
            columns.push(out);
        }
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

fn msg(e: Error) -> String {
    match e {
        Error::InvalidConfig(m) => m,
        other => other.to_string(),
    }
}

weir_sdk::export_transform!(Cast);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::arrow_array::types::{Date32Type, Int64Type, TimestampMicrosecondType};
    use weir_sdk::arrow_schema::TimeUnit;
    use weir_sdk::testing::Harness;

    fn input() -> RecordBatch {
        RecordBatch::try_from_iter([
            ("id", Arc::new(StringArray::from(vec![Some("1"), Some("2"), None])) as ArrayRef),
            (
                "at",
                Arc::new(StringArray::from(vec!["2024-01-02T10:00:00", "2024-01-03 23:59:59", "2024-01-04T00:00:00Z"]))
                    as ArrayRef,
            ),
            ("junk", Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef),
        ])
        .unwrap()
    }

    const CFG: &str = r#"columns = [
        { column = "id", type = "int64", rename = "order_id" },
        { column = "at", type = "timestamp" },
        { column = "at", type = "date", rename = "day" },
    ]"#;

    #[test]
    fn selects_renames_and_casts() {
        let batch = input();
        let mut h = Harness::<Cast>::new(CFG, &batch.schema()).unwrap();
        let out = h.run(&[batch]).unwrap();
        assert_eq!(out.num_columns(), 3);
        assert_eq!(out.schema().field(0).name(), "order_id");
        let ids = out.column(0).as_primitive::<Int64Type>();
        assert_eq!(ids.value(1), 2);
        assert!(ids.is_null(2));
        let at = out.column(1).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(at.value(0), 1_704_189_600_000_000);
        let day = out.column(2).as_primitive::<Date32Type>();
        assert_eq!(day.value(1), 19725); // 2024-01-03
    }

    #[test]
    fn casting_every_column_in_place_is_a_rewrite_of_the_changed_ones() {
        let batch = input();
        let cfg = r#"columns = [{ column = "id", type = "int64" }, { column = "at", type = "timestamp" }, { column = "junk" }]"#;
        let mut h = Harness::<Cast>::new(cfg, &batch.schema()).unwrap();
        let out = h.run(std::slice::from_ref(&batch)).unwrap();
        assert_eq!(out.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![1, 2, 0]);
        assert!(out.column(0).is_null(2));
        assert_eq!(out.column(1).data_type(), &DataType::Timestamp(TimeUnit::Microsecond, None));
        assert_eq!(out.column(2), batch.column(2), "the unchanged column passes through");
        let cast = |cfg: &str| {
            let config = weir_sdk::runner::parse_config(cfg).unwrap();
            Cast::new(config, &batch.schema(), &Context::default()).unwrap().rewrites()
        };
        let all = r#"{"columns": [{"column": "id", "type": "int64"}, {"column": "at"}, {"column": "junk"}]}"#;
        assert_eq!(cast(all), Some(vec!["id".to_string()]));
        // selecting, reordering, renaming or changing nothing is not a rewrite
        assert_eq!(cast(r#"{"columns": [{"column": "id", "type": "int64"}, {"column": "at"}]}"#), None);
        let swapped = r#"{"columns": [{"column": "at"}, {"column": "id", "type": "int64"}, {"column": "junk"}]}"#;
        assert_eq!(cast(swapped), None);
        let renamed =
            r#"{"columns": [{"column": "id", "type": "int64", "rename": "n"}, {"column": "at"}, {"column": "junk"}]}"#;
        assert_eq!(cast(renamed), None);
        assert_eq!(cast(r#"{"columns": [{"column": "id"}, {"column": "at"}, {"column": "junk"}]}"#), None);
        // a bad value still names its row and column
        let bad = RecordBatch::try_from_iter([
            ("id", Arc::new(StringArray::from(vec!["1", "x2"])) as ArrayRef),
            ("at", Arc::new(StringArray::from(vec!["2024-01-02", "2024-01-02"])) as ArrayRef),
            ("junk", Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef),
        ])
        .unwrap();
        let mut h = Harness::<Cast>::new(cfg, &bad.schema()).unwrap();
        match h.process(&bad).unwrap_err() {
            Error::InvalidInput { row, column, .. } => {
                assert_eq!(row, Some(1));
                assert_eq!(column.as_deref(), Some("id"));
            }
            other => panic!("wrong error {other}"),
        }
    }

    #[test]
    fn bad_value_names_row_column_and_value() {
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(StringArray::from(vec!["1", "2", "x3"])) as ArrayRef),
            ("at", Arc::new(StringArray::from(vec!["2024-01-02", "2024-01-02", "2024-01-02"])) as ArrayRef),
        ])
        .unwrap();
        let mut h = Harness::<Cast>::new(CFG, &batch.schema()).unwrap();
        let err = h.process(&batch).unwrap_err();
        match &err {
            Error::InvalidInput { row, column, message } => {
                assert_eq!(*row, Some(2));
                assert_eq!(column.as_deref(), Some("id"));
                assert!(message.contains("x3"), "{message}");
            }
            other => panic!("wrong error {other}"),
        }
    }

    #[test]
    fn text_to_timestamps_in_every_form_and_zone() {
        let batch = RecordBatch::try_from_iter([(
            "at",
            Arc::new(StringArray::from(vec![
                Some("2024-01-02T10:00:00"),
                None,
                Some("2024-01-02 10:00:00.250"),
                Some("2024-01-02T12:00:00+02:00"),
            ])) as ArrayRef,
        )])
        .unwrap();
        let cfg = r#"columns = [{ column = "at", type = "timestamp" }, { column = "at", type = "timestamp_tz", rename = "at_utc" }]"#;
        let mut h = Harness::<Cast>::new(cfg, &batch.schema()).unwrap();
        let out = h.run(&[batch.clone(), batch.slice(0, 2)]).unwrap();
        assert_eq!(out.schema().field(1).data_type(), &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())));
        for c in 0..2 {
            let at = out.column(c).as_primitive::<TimestampMicrosecondType>();
            assert_eq!(at.value(0), 1_704_189_600_000_000);
            assert!(at.is_null(1));
            assert_eq!(at.value(2), 1_704_189_600_250_000);
            assert_eq!(at.value(3), 1_704_189_600_000_000);
            assert_eq!(at.value(4), 1_704_189_600_000_000); // the second batch: fixed-width only
            assert!(at.is_null(5));
        }
        // a date that does not exist is refused by name, whichever path parsed the rest
        let bad = RecordBatch::try_from_iter([(
            "at",
            Arc::new(StringArray::from(vec!["2024-01-02T10:00:00", "2023-02-29T10:00:00"])) as ArrayRef,
        )])
        .unwrap();
        match h.process(&bad).unwrap_err() {
            Error::InvalidInput { row, column, message } => {
                assert_eq!((row, column.as_deref()), (Some(1), Some("at")));
                assert!(message.contains("2023-02-29T10:00:00"), "{message}");
            }
            other => panic!("wrong error {other}"),
        }
    }

    #[test]
    fn config_errors() {
        let s = input().schema();
        let e = Harness::<Cast>::new("columns = [{ column = \"id\", type = \"int128\" }]", &s).err().unwrap();
        assert!(e.to_string().contains("int128") && e.to_string().contains("columns[0].type"), "{e}");
        let e = Harness::<Cast>::new("columns = [{ column = \"idd\" }]", &s).err().unwrap();
        assert!(e.to_string().contains("idd"), "{e}");
        let e = Harness::<Cast>::new("columns = [{ column = \"id\", as = \"x\" }]", &s).err().unwrap();
        assert!(e.to_string().contains("as"), "{e}");
    }
}
