//! The per-record Wasm runner: the workload as a component called once per row (see
//! `bench/wit/record.wit`), with the same Parquet reader and writer settings as the native
//! runner and the same wasmtime configuration as weir. Rows cross the boundary as a
//! `list<value>`; the HMAC of W1 is a host call per row.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    path: "wit/record.wit",
    world: "record-plugin",
});

use exports::weir_bench::per_record::row_transform::Value;

struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    hasher: weir_sdk::hashing::Hasher,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl weir_bench::per_record::host::Host for Host {
    fn hmac_hex(&mut self, value: String) -> String {
        let mut hex = [0u8; 64];
        self.hasher.hex_into(value.as_bytes(), &mut hex);
        hex.iter().map(|&b| char::from(b)).collect()
    }
}

pub fn run(
    workload: &str,
    plugin: &Path,
    input: &Path,
    output: &Path,
    key: &[u8],
    compression: weir::config::Codec,
) -> Result<()> {
    let (columns, schema): (Option<&[&str]>, SchemaRef) = match workload {
        "W1" => (None, crate::events_schema()),
        "W2" => (Some(&crate::W2_COLUMNS), crate::w2_schema()),
        other => bail!("the per-record runner does {other}? only W1 and W2"),
    };
    // weir's engine settings: component model, Cranelift at speed, epoch checks compiled in
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let engine = Engine::new(&config).map_err(|e| anyhow!("{e}"))?;
    let component = Component::from_file(&engine, plugin).map_err(|e| anyhow!("{}: {e}", plugin.display()))?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow!("{e}"))?;
    weir_bench::per_record::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| anyhow!("{e}"))?;
    let host = Host {
        wasi: WasiCtxBuilder::new().build(),
        table: ResourceTable::new(),
        hasher: weir_sdk::hashing::Hasher::hmac(key),
    };
    let mut store = Store::new(&engine, host);
    store.set_epoch_deadline(u64::MAX);
    let plugin = RecordPlugin::instantiate(&mut store, &component, &linker).map_err(|e| anyhow!("{e}"))?;
    let rt = plugin.weir_bench_per_record_row_transform();
    rt.call_init(&mut store, workload).map_err(|e| anyhow!("{e}"))?.map_err(|e| anyhow!("init: {e}"))?;

    let mut writer = ArrowWriter::try_new(File::create(output)?, schema.clone(), Some(crate::props(compression)))?;
    let mut row = Vec::new();
    for batch in crate::read_columns(input, columns)? {
        let batch = batch?;
        // column types are resolved once a batch; the per-row work is the call itself
        let inputs = batch.columns().iter().map(Input::of).collect::<Result<Vec<_>>>()?;
        let mut outputs =
            schema.fields().iter().map(|f| Output::of(f.data_type(), batch.num_rows())).collect::<Result<Vec<_>>>()?;
        for r in 0..batch.num_rows() {
            row.clear();
            row.extend(inputs.iter().map(|c| c.value(r)));
            let out =
                rt.call_process(&mut store, &row).map_err(|e| anyhow!("{e}"))?.map_err(|e| anyhow!("row {r}: {e}"))?;
            if let Some(out) = out {
                if out.len() != outputs.len() {
                    bail!("the plugin returned {} values for {} columns", out.len(), outputs.len());
                }
                for (o, v) in outputs.iter_mut().zip(out) {
                    o.append(v)?;
                }
            }
        }
        let cols: Vec<ArrayRef> = outputs.iter_mut().map(Output::finish).collect();
        let out = RecordBatch::try_new(schema.clone(), cols)?;
        if out.num_rows() > 0 {
            writer.write(&out)?;
        }
    }
    writer.close()?;
    Ok(())
}

/// An input column, typed once a batch.
enum Input<'a> {
    I64(&'a Int64Array),
    I32(&'a Int32Array),
    F64(&'a Float64Array),
    Text(&'a StringArray),
    Bool(&'a BooleanArray),
}

impl<'a> Input<'a> {
    fn of(c: &'a ArrayRef) -> Result<Input<'a>> {
        Ok(match c.data_type() {
            DataType::Int64 => Input::I64(c.as_primitive::<Int64Type>()),
            DataType::Int32 => Input::I32(c.as_primitive::<Int32Type>()),
            DataType::Float64 => Input::F64(c.as_primitive::<Float64Type>()),
            DataType::Utf8 => Input::Text(c.as_string::<i32>()),
            DataType::Boolean => Input::Bool(c.as_boolean()),
            other => bail!("no per-record value for {other}"),
        })
    }

    fn value(&self, r: usize) -> Value {
        let valid = match self {
            Input::I64(a) => a.is_valid(r),
            Input::I32(a) => a.is_valid(r),
            Input::F64(a) => a.is_valid(r),
            Input::Text(a) => a.is_valid(r),
            Input::Bool(a) => a.is_valid(r),
        };
        if !valid {
            return Value::Null;
        }
        match self {
            Input::I64(a) => Value::Int(a.value(r)),
            Input::I32(a) => Value::Int(a.value(r) as i64),
            Input::F64(a) => Value::Float(a.value(r)),
            Input::Text(a) => Value::Text(a.value(r).to_string()),
            Input::Bool(a) => Value::Boolean(a.value(r)),
        }
    }
}

/// An output column being built, typed once a batch.
enum Output {
    I64(Int64Builder),
    I32(Int32Builder),
    F64(Float64Builder),
    Text(StringBuilder),
    Bool(BooleanBuilder),
    Micros(TimestampMicrosecondBuilder),
}

impl Output {
    fn of(t: &DataType, rows: usize) -> Result<Output> {
        Ok(match t {
            DataType::Int64 => Output::I64(Int64Builder::with_capacity(rows)),
            DataType::Int32 => Output::I32(Int32Builder::with_capacity(rows)),
            DataType::Float64 => Output::F64(Float64Builder::with_capacity(rows)),
            DataType::Utf8 => Output::Text(StringBuilder::with_capacity(rows, rows * 16)),
            DataType::Boolean => Output::Bool(BooleanBuilder::with_capacity(rows)),
            DataType::Timestamp(TimeUnit::Microsecond, None) => {
                Output::Micros(TimestampMicrosecondBuilder::with_capacity(rows))
            }
            other => bail!("no per-record output column for {other}"),
        })
    }

    fn append(&mut self, v: Value) -> Result<()> {
        match (self, v) {
            (Output::I64(b), Value::Null) => b.append_null(),
            (Output::I32(b), Value::Null) => b.append_null(),
            (Output::F64(b), Value::Null) => b.append_null(),
            (Output::Text(b), Value::Null) => b.append_null(),
            (Output::Bool(b), Value::Null) => b.append_null(),
            (Output::Micros(b), Value::Null) => b.append_null(),
            (Output::I64(b), Value::Int(x)) => b.append_value(x),
            (Output::I32(b), Value::Int(x)) => b.append_value(i32::try_from(x).context("int32 out of range")?),
            (Output::F64(b), Value::Float(x)) => b.append_value(x),
            (Output::Text(b), Value::Text(x)) => b.append_value(x),
            (Output::Bool(b), Value::Boolean(x)) => b.append_value(x),
            (Output::Micros(b), Value::Int(x)) => b.append_value(x),
            (_, other) => bail!("the plugin returned {other:?}, which does not fit its column"),
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Output::I64(b) => Arc::new(b.finish()),
            Output::I32(b) => Arc::new(b.finish()),
            Output::F64(b) => Arc::new(b.finish()),
            Output::Text(b) => Arc::new(b.finish()),
            Output::Bool(b) => Arc::new(b.finish()),
            Output::Micros(b) => Arc::new(b.finish()),
        }
    }
}
